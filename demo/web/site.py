"""The files of the browser sampler page and two ways to serve them, both cross-origin isolated.

The page (`index.html`, `app.js`, `sampler.js`, `style.css`) loads onnxruntime-web from `ort/` and the model's
ONNX export from `model/`, all on its own host. [`site_files`] maps exactly those URL paths to files: nothing
else is served, so no request can reach another path of the machine.

- [`serve`]: a threaded standard-library HTTP server (tests, benchmarks, `python -m ddpm_plugin.demo.web.site`).
- [`asgi_app`] / [`page_mount`]: the same files as a Starlette app, mounted beside the Gradio demo (`ddpm demo`
  serves it at `/web/`).

Both send `Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy: require-corp`: with
them the page is cross-origin isolated, which is what lets onnxruntime-web run WASM threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import os
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "app.js", "sampler.js", "style.css")
ORT_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
# The WASM build, and the WebGPU build the page loads when the browser has a WebGPU adapter.
ORT_FILES = (
    "ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
    "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
)
WEB_PATH = "/web"  # where `ddpm demo` serves the page
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
CONTENT_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                 ".json": "application/json", ".onnx": "application/octet-stream", ".css": "text/css",
                 ".html": "text/html; charset=utf-8"}


def site_files(export_dir: str | os.PathLike) -> dict[str, Path]:
    """URL path (relative to the page, `""` for the page itself) -> file, for the page on `export_dir`.

    Raises:
        `FileNotFoundError`: onnxruntime-web is not installed (`npm ci` in demo/web), or the export lacks a file
        the page reads (`diffusion_coefficients.json` comes from `ddpm_plugin.export.coefficients`).
    """
    from ddpm_plugin.export.coefficients import COEFFICIENTS_FILE
    from ddpm_plugin.export.onnx_pipeline import METADATA_FILE, MODEL_FILE, resolve_export_folder

    missing_ort = [name for name in ORT_FILES if not (ORT_DIST / name).is_file()]
    if missing_ort:
        raise FileNotFoundError(
            f"onnxruntime-web is not installed ({ORT_DIST / missing_ort[0]} is missing); run `npm ci` in {WEB_DIR}."
        )
    folder = resolve_export_folder(export_dir)
    model_file = json.loads((folder / METADATA_FILE).read_text()).get("model_file", MODEL_FILE)
    files = {"": WEB_DIR / "index.html", **{name: WEB_DIR / name for name in PAGE_FILES}}
    files.update({f"ort/{name}": ORT_DIST / name for name in ORT_FILES})
    files.update({f"model/{name}": folder / name for name in (METADATA_FILE, COEFFICIENTS_FILE, model_file)})
    absent = [str(path) for path in files.values() if not path.is_file()]
    if absent:
        raise FileNotFoundError(f"the browser page needs {absent[0]}; write the coefficients with "
                                f"`python -m ddpm_plugin.export.coefficients {folder}`.")
    return files


def content_type(path: str) -> str:
    return CONTENT_TYPES.get(Path(path).suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


# --- The standard-library server. ---


class _Handler(SimpleHTTPRequestHandler):
    files: dict[str, Path] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0].lstrip("/")
        file = self.files.get(path)
        if file is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        body = file.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type(file.name))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:  # the browser closed the page or cancelled the download
            pass

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

    def end_headers(self) -> None:
        # On every response, errors included: a failed request must not read as a cross-origin (CORP) refusal.
        for name, value in ISOLATION_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read the page, not the log
        pass


def serve(export_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve the page on `export_dir` in a daemon thread; the page is at `http://host:server.server_port/`.
    Call `server.shutdown()` to stop it."""
    handler = type("PageHandler", (_Handler,), {"files": site_files(export_dir)})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- The ASGI app for `ddpm demo`. ---


def asgi_app(export_dir: str | os.PathLike) -> Any:
    """The page on `export_dir` as a Starlette app, for `starlette.routing.Mount("/web", app=...)` beside Gradio."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    files = site_files(export_dir)

    async def page(request: Any) -> Any:
        path = request.path_params["path"]
        if path == "" and not request.url.path.endswith("/"):
            # The page's relative URLs (app.js, model/...) need the folder's trailing slash.
            return RedirectResponse(request.url.replace(path=request.url.path + "/"), headers=ISOLATION_HEADERS)
        file = files.get(path)
        if file is None:
            return PlainTextResponse("Not found", status_code=404, headers=ISOLATION_HEADERS)
        return FileResponse(file, media_type=content_type(file.name), headers=ISOLATION_HEADERS)

    return Starlette(routes=[Route("/{path:path}", page, methods=["GET"])])


def page_mount(export_dir: str | os.PathLike, path: str = WEB_PATH) -> Any | None:
    """`starlette.routing.Mount(path, ...)` serving the page on `export_dir`, or None (with a logged reason) when
    onnxruntime-web or a file of the export is missing: the Gradio demo then runs without the link."""
    from starlette.routing import Mount

    try:
        return Mount(path, app=asgi_app(export_dir))
    except FileNotFoundError as error:
        logger.warning("the browser sampler page is off: %s", error)
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m ddpm_plugin.demo.web.site [--model DIR] [--port N]`: serve the page until interrupted."""
    from ddpm_plugin.bundled import resolve_model

    parser = argparse.ArgumentParser(description="Serve the browser sampler page (cross-origin isolated).")
    parser.add_argument("--model", default=None, help="ONNX export or pipeline folder (default: the bundled model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server = serve(args.model or resolve_model(None), args.host, args.port)
    print(f"The browser sampler is on http://{args.host}:{server.server_port}/ (Ctrl+C stops it).")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
