"""The files of the browser sampler page, the servers that serve them cross-origin isolated, and a static copy.

The page (`index.html`, `app.js`, `sampler.js`, `style.css`) loads onnxruntime-web from `ort/` and the model's
ONNX export from `model/`, all on its own host. [`site_files`] maps exactly those URL paths to files: nothing
else is served, so no request can reach another path of the machine. onnxruntime-web's files come from npm's
`node_modules` in a source checkout, or from the installed package's `ort/` folder, where setup.py copies them
when it builds a wheel.

- [`serve`]: a threaded standard-library HTTP server (tests, benchmarks, `python -m ddpm_plugin.demo.web.site`).
- [`asgi_app`] / [`mount_page`]: the same files as a Starlette app, mounted on the Gradio demo's app (`ddpm demo`
  serves it at `/web/`).
- [`write_space`]: the same files copied into a static folder (a Hugging Face Space with `sdk: static`), which
  any static server serves as it is.

The servers send `Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy: require-corp`: with
them the page is cross-origin isolated, which is what lets onnxruntime-web run WASM threads. Without them (a
plain static server) the page runs one WASM thread.
"""

from __future__ import annotations

import argparse
import logging
import mimetypes
import os
import shutil
import stat
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ddpm_plugin.trust import UntrustedInputError, check_no_links, read_json
from ddpm_plugin.vocabulary import ONNX_METADATA_FILE, ONNX_MODEL_FILE

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "app.js", "sampler.js", "style.css")
ORT_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"  # `npm ci` in a source checkout
ORT_PACKAGED = WEB_DIR / "ort"  # where setup.py copies ORT_FILES into a built wheel
# The WASM build, and the WebGPU build the page loads when the browser has a WebGPU adapter. setup.py reads
# this tuple (it cannot import the package) to copy exactly these files into a wheel.
ORT_FILES = (
    "ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
    "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm",
)
WEB_PATH = "/web"  # where `ddpm demo` serves the page
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
CONTENT_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                 ".json": "application/json", ".onnx": "application/octet-stream", ".css": "text/css",
                 ".html": "text/html; charset=utf-8"}
# A static Space's README: the front matter configures the Space (sdk: static serves the folder as it is;
# custom_headers make the page cross-origin isolated, so it runs WASM threads).
SPACE_README = """---
title: DDPM in your browser
emoji: 🌀
colorFrom: gray
colorTo: indigo
sdk: static
app_file: index.html
pinned: false
custom_headers:
  cross-origin-embedder-policy: require-corp
  cross-origin-opener-policy: same-origin
  cross-origin-resource-policy: cross-origin
---

# DDPM in your browser

Samples from a denoising diffusion probabilistic model (Ho, Jain, Abbeel 2020) computed in the visitor's browser
by onnxruntime-web: the {preset} model ({size}x{size}x{channels}), the paper's 1000-step ancestral sampler and
DDIM. Nothing runs on the server: the page downloads the model (`model/`, {model_mb:.1f} MB) and onnxruntime-web's
WebAssembly runtime (`ort/`, {runtime_mb:.1f} MB) once, and loads nothing from another host.

Written by `python -m ddpm_plugin.demo.web.site --space FOLDER` (ddpm-plugin). Upload the folder as it is into a
static Space, e.g. `hf upload --repo-type space USER/NAME FOLDER .`
"""


def site_files(export_dir: str | os.PathLike) -> dict[str, Path]:
    """URL path (relative to the page, `""` for the page itself) -> file, for the page on `export_dir`.

    Raises:
        `UntrustedInputError`: the export folder holds a link or a special file (anywhere in it).
        `FileNotFoundError`: onnxruntime-web is not installed (`npm ci` in demo/web), or the export lacks a file
        the page reads (`diffusion_coefficients.json` comes from `ddpm_plugin.export.coefficients`).
        `OnnxModelError`: the export's metadata names a model outside the export folder, or it is an int8 export
        with a float32 graph for small t (the page runs one graph).
    """
    from ddpm_plugin.export.coefficients import COEFFICIENTS_FILE
    from ddpm_plugin.export.onnx_pipeline import OnnxModelError, model_file_in, resolve_export_folder

    folder = resolve_export_folder(export_dir)
    check_no_links(folder)
    ort_dist = find_ort_dist()
    metadata = read_json(folder / ONNX_METADATA_FILE)
    if metadata.get("float32_below_t"):
        raise OnnxModelError(
            f"{folder} is an int8 export that runs its float32 graph for t < {metadata['float32_below_t']}; the page "
            "runs one graph at every step, so serve a float32 export (`ddpm export` without --quantize) instead."
        )
    model_file = metadata.get("model_file", ONNX_MODEL_FILE)
    model_file_in(folder, model_file)  # the page serves the export's own model, as the Python sampler loads it
    files = {"": WEB_DIR / "index.html", **{name: WEB_DIR / name for name in PAGE_FILES}}
    files.update({f"ort/{name}": ort_dist / name for name in ORT_FILES})
    files.update({f"model/{name}": folder / name for name in (ONNX_METADATA_FILE, COEFFICIENTS_FILE, model_file)})
    absent = [str(path) for path in files.values() if not path.is_file()]
    if absent:
        raise FileNotFoundError(f"the browser page needs {absent[0]}; write the coefficients with "
                                f"`python -m ddpm_plugin.export.coefficients {folder}`.")
    return files


def find_ort_dist() -> Path:
    """The folder holding every one of ORT_FILES: the installed package's `ort/` (a wheel built where
    onnxruntime-web was installed), else npm's `node_modules` (a source checkout after `npm ci`).

    Raises:
        `FileNotFoundError`: neither holds them; the message says how to get them.
    """
    for folder in (ORT_PACKAGED, ORT_DIST):
        if all((folder / name).is_file() for name in ORT_FILES):
            return folder
    raise FileNotFoundError(
        f"onnxruntime-web is not installed: neither {ORT_PACKAGED} nor {ORT_DIST} holds {ORT_FILES[0]}. In a source "
        f"checkout run `npm ci` in {WEB_DIR}; a wheel holds it only when it was built after that `npm ci`."
    )


def still_regular(path: Path) -> bool:
    """Whether `path` is (still) a regular file reached without a link at its last component: a file checked at
    start-up and replaced by a link since is not served."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def content_type(path: str) -> str:
    return CONTENT_TYPES.get(Path(path).suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


# --- The standard-library server. ---


class _Handler(SimpleHTTPRequestHandler):
    files: dict[str, Path] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0].lstrip("/")
        file = self.files.get(path)
        if file is None or not still_regular(file):
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
        if file is None or not still_regular(file):
            return PlainTextResponse("Not found", status_code=404, headers=ISOLATION_HEADERS)
        return FileResponse(file, media_type=content_type(file.name), headers=ISOLATION_HEADERS)

    return Starlette(routes=[Route("/{path:path}", page, methods=["GET"])])


def mount_page(app: Any, export_dir: str | os.PathLike, path: str = WEB_PATH) -> str:
    r"""
    Mount the page on `export_dir` at `path` of a running or new FastAPI/Starlette app (Gradio's `demo.app`).

    Only the mounted path sends the cross-origin isolation headers; the app's other routes are unchanged. When
    the page cannot be served (onnxruntime-web not installed, the export lacks `diffusion_coefficients.json`),
    `path` answers 503 with the reason instead, and the reason is logged, so a link to it never dangles.

    Args:
        app (`fastapi.FastAPI` or `starlette.applications.Starlette`):
            The app; `app.mount(path, ...)` is called on it.
        export_dir (`str` or `os.PathLike`):
            An ONNX export folder, or a pipeline folder holding it in `onnx/`.
        path (`str`, *optional*, defaults to `"/web"`):
            Where to mount the page.

    Returns:
        `str`: the page's URL path, with the trailing slash its relative URLs need (`"/web/"`).
    """
    from ddpm_plugin.export.onnx_pipeline import OnnxModelError

    try:
        page = asgi_app(export_dir)
    except (FileNotFoundError, OnnxModelError, UntrustedInputError) as error:
        logger.warning("the browser sampler page is off: %s", error)
        page = _unavailable_app(f"The browser sampler is off: {error}")
    app.mount(path, page)
    return path.rstrip("/") + "/"


def _unavailable_app(reason: str) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def explain(request: Any) -> Any:
        return PlainTextResponse(reason, status_code=HTTPStatus.SERVICE_UNAVAILABLE, headers=ISOLATION_HEADERS)

    return Starlette(routes=[Route("/{path:path}", explain, methods=["GET"])])


# --- A static Hugging Face Space. ---


def write_space(export_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    r"""
    Write the page on `export_dir` as a self-contained static folder: a Hugging Face Space (`sdk: static`), or any
    static web server's root.

    The folder holds exactly the files [`site_files`] serves, at the same URL paths (`index.html`, its scripts,
    `ort/` and `model/`), and a `README.md` whose front matter makes it a static Space that sends the
    cross-origin isolation headers (`custom_headers`), so the page runs WASM threads there. Served without those
    headers (`python -m http.server`), the page runs one WASM thread.

    Args:
        export_dir (`str` or `os.PathLike`):
            An ONNX export folder, or a pipeline folder holding it in `onnx/`.
        output_dir (`str` or `os.PathLike`):
            The folder to write; it must not exist or be empty.

    Returns:
        `Path`: `output_dir`.

    Raises:
        `UntrustedInputError`, `FileNotFoundError`, `OnnxModelError`: as [`site_files`].
        `FileExistsError`: `output_dir` holds files.
    """
    files = site_files(export_dir)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; write the Space into a new folder.")
    for url_path, source in files.items():
        if url_path:  # "" is index.html again
            target = output_dir / url_path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not still_regular(source):
                raise UntrustedInputError(f"{source} is no longer a regular file; only regular files are copied.")
            shutil.copyfile(source, target, follow_symlinks=False)
    metadata = read_json(output_dir / "model" / ONNX_METADATA_FILE)
    (output_dir / "README.md").write_text(SPACE_README.format(
        preset=metadata.get("preset") or "DDPM", size=metadata["sample_size"], channels=metadata["in_channels"],
        model_mb=(output_dir / "model" / metadata.get("model_file", ONNX_MODEL_FILE)).stat().st_size / 1e6,
        runtime_mb=(output_dir / "ort" / "ort-wasm-simd-threaded.wasm").stat().st_size / 1e6,
    ))
    # Files over 10 MB (the .wasm runtime, larger models) must go through Git LFS when the folder is pushed with git.
    (output_dir / ".gitattributes").write_text("*.wasm filter=lfs diff=lfs merge=lfs -text\n"
                                               "*.onnx filter=lfs diff=lfs merge=lfs -text\n")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m ddpm_plugin.demo.web.site [--model DIR] [--port N]`: serve the page until interrupted;
    `... --space FOLDER`: write it as a static Space folder instead."""
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.export.onnx_pipeline import OnnxModelError

    parser = argparse.ArgumentParser(description="Serve the browser sampler page (cross-origin isolated).")
    parser.add_argument("--model", default=None, help="ONNX export or pipeline folder, or a bundled model's name (default: the bundled model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--space", metavar="FOLDER", help="write a static Hugging Face Space folder and exit")
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    if args.space:
        try:
            folder = write_space(model, args.space)
        except (FileNotFoundError, FileExistsError, OnnxModelError, UntrustedInputError) as error:
            parser.exit(1, f"error: {error}\n")
        size_mb = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6
        print(f"{folder}: a static Space of {size_mb:.1f} MB (upload it as it is).")
        return 0
    try:
        server = serve(model, args.host, args.port)
    except (FileNotFoundError, OnnxModelError, UntrustedInputError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"The browser sampler is on http://{args.host}:{server.server_port}/ (Ctrl+C stops it).")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
