"""What the demo takes from visitors, and for how long it keeps it.

- **Request bodies are bounded** before they are read: `MAX_UPLOAD_BODY_BYTES` for an upload (one picture and
  its multipart envelope), `MAX_JSON_BYTES` for every other request. A larger body gets 413 and a message.
- **Uploads are pictures** (PNG, JPEG, WebP, GIF or BMP) whose declared size is within `MAX_UPLOAD_PIXELS`,
  checked from the file's header before anything decodes it: a 0.5 MB PNG may declare 13,000 x 13,000 pixels
  and take gigabytes once decoded. Anything else is deleted at once and refused with a message (415 or 413).
- **Uploads live until the request that uses them ends.** Each admitted picture moves to a folder of its own
  (Gradio names uploads by their content, so two visitors sending one picture would share, and delete, one
  file); the request that reads it deletes it, and one that no request uses is deleted after
  `UPLOAD_TTL_SECONDS`. Until then it is served (the page previews it) under its unguessable path.
- **A picture input reads admitted uploads only** ([`UploadStore.read`]): any other path a client sends, absolute
  or relative, existing or not, gets the one message [`NOT_AN_UPLOAD`], which says nothing about the path. A
  gallery picture the page hands to another tab is copied in as an upload ([`UploadStore.adopt`]).

[`UploadGuard`] enforces the first two in front of Gradio's routes; [`UploadStore`] owns the folder. This module
needs Pillow, NumPy and `ddpm_plugin.trust` only.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from ddpm_plugin.trust import regular_file

MAX_FILE_SIZE = 2 * 2**20  # largest picture, in bytes (Gradio's `max_file_size` enforces it too)
MAX_UPLOAD_BODY_BYTES = MAX_FILE_SIZE + 64 * 2**10  # an upload request: one picture and the multipart envelope
MAX_JSON_BYTES = 64 * 2**10  # any other request body; the largest real one (a 16-picture gallery) is ~10 KB
MAX_UPLOAD_PIXELS = 2048 * 2048  # declared width x height of an upload; the largest model is 256 x 256
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
UPLOAD_TTL_SECONDS = 600  # an upload that no request used is deleted after this
MAX_PENDING_UPLOADS = 256  # uploads waiting for their request; beyond that new ones are turned away
UPLOAD_ROUTE = "/gradio_api/upload"
# The one answer for a picture input that is not a current upload: the same for every path, so no answer says
# whether a server file exists.
NOT_AN_UPLOAD = "{name}: upload it again; the demo reads only pictures uploaded to it, each for one request."

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class RefusedUpload(ValueError):
    """An upload or request body the demo does not take; `status` is the HTTP answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_picture(name: str, path: str | Path) -> None:
    """A [`RefusedUpload`] naming `name` unless `path` is a picture of an accepted format within the pixel
    budget. Only the header is read."""
    try:
        with Image.open(path) as picture:
            picture_format, (width, height) = picture.format, picture.size
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise RefusedUpload(f"{name} declares more than {MAX_UPLOAD_PIXELS:,} pixels; upload a smaller picture.", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        picture_format, width, height = None, 0, 0
    if picture_format not in UPLOAD_FORMATS:
        raise RefusedUpload(f"{name} is not a picture; upload a {', '.join(UPLOAD_FORMATS)} image.", 415)
    if width * height > MAX_UPLOAD_PIXELS:
        raise RefusedUpload(
            f"{name} is {width:,} x {height:,} pixels; the demo takes pictures of at most {MAX_UPLOAD_PIXELS:,} pixels "
            "(2048 x 2048): scale it down first.", 413,
        )


def read_picture(name: str, path: str | Path) -> np.ndarray:
    """The picture at `path` (an admitted upload, see [`UploadStore.path_of`]) as a uint8 RGB (height, width, 3)
    array, decoded only after [`check_picture`]."""
    check_picture(name, path)
    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # a header that promises more than the file holds
        raise RefusedUpload(f"{name} cannot be decoded ({type(error).__name__}); upload another picture.", 415) from None


class UploadStore:
    """The folder of admitted uploads, `root/uploads/<random id>/<name>`; `root` is Gradio's file folder of this
    run (uploads and the pictures the demo generated)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.folder = self.root / "uploads"

    def holds(self, path: str | Path | None) -> bool:
        return path is not None and Path(path).resolve().is_relative_to(self.folder)

    def read(self, name: str, value: Any) -> np.ndarray:
        """The picture of the upload that a picture input's `value` (Gradio's `FileData` or its dict) names; a
        `ValueError` with the one message [`NOT_AN_UPLOAD`] for anything else."""
        if value is None:
            raise ValueError(f"{name}: upload an image first.")
        return read_picture(name, _inside(self.folder, picture_path(value), NOT_AN_UPLOAD.format(name=name)))

    def adopt(self, path: Any) -> str:
        """A picture this run generated (`path` inside `root`, a regular file), copied in as an upload of its own
        for the request that reads it; a `ValueError` for any other path."""
        source = _inside(self.root, path, "Use a picture of the gallery above: generate images first.")
        target = self.folder / uuid.uuid4().hex / source.name
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
        return str(target)

    def admit(self, paths: list[str]) -> list[str]:
        """Check the files Gradio has just stored; move each into a folder of its own and return the new paths,
        or delete them all and raise [`RefusedUpload`]."""
        self.sweep()
        try:
            if len(self._pending()) + len(paths) > MAX_PENDING_UPLOADS:
                raise RefusedUpload("The demo holds too many unused uploads; try again in a few minutes.", 503)
            for path in paths:
                check_picture(f"The upload {Path(path).name!r}", path)
        except RefusedUpload:
            for path in paths:
                _remove(Path(path))
            raise
        admitted = []
        for path in map(Path, paths):
            target = self.folder / uuid.uuid4().hex / path.name
            target.parent.mkdir(parents=True)
            shutil.move(path, target)
            _remove(path)
            admitted.append(str(target))
        return admitted

    def discard(self, path: str | Path | None) -> None:
        """Delete an admitted upload (and its folder); other paths (the pictures the demo generated) are kept."""
        if self.holds(path):
            shutil.rmtree(Path(path).resolve().parent, ignore_errors=True)

    def sweep(self) -> None:
        """Delete the uploads no request has used within `UPLOAD_TTL_SECONDS`."""
        expired = time.time() - UPLOAD_TTL_SECONDS
        for folder in self._pending():
            if folder.stat().st_mtime < expired:
                shutil.rmtree(folder, ignore_errors=True)

    def _pending(self) -> list[Path]:
        return list(self.folder.iterdir()) if self.folder.is_dir() else []


def picture_path(value: Any) -> Any:
    """The path a picture input's value names (a path, Gradio's `FileData` or its dict), unchecked; None when
    none."""
    if isinstance(value, str):
        return value
    return value.get("path") if isinstance(value, dict) else getattr(value, "path", None)


def _inside(folder: Path, path: Any, message: str) -> Path:
    """`path` when it names a regular file below `folder` reached through no link; else `ValueError(message)`,
    the same whatever the path (absolute or relative, existing or not)."""
    try:
        return regular_file(folder, Path(path).relative_to(folder))
    except (TypeError, ValueError, OSError):  # UntrustedInputError is a ValueError, FileNotFoundError an OSError
        raise ValueError(message) from None


def _remove(path: Path) -> None:
    """Delete an upload Gradio stored, and its content-named folder when that is left empty."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty (another upload of the same content) or already gone
        pass


class UploadGuard:
    """ASGI middleware in front of Gradio's routes: bounded request bodies, and uploads admitted by `store`.

    Add it with `demo.launch(app_kwargs={"middleware": [Middleware(UploadGuard, store=store)]})`.
    """

    def __init__(self, app: Callable, store: UploadStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope["path"] == UPLOAD_ROUTE and scope["method"] == "POST"
        limit = MAX_UPLOAD_BODY_BYTES if is_upload else MAX_JSON_BYTES
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise _too_large(limit)
            receive = _bounded(receive, limit)
            if not is_upload:
                return await self.app(scope, receive, send)
            return await self._upload(scope, receive, send)
        except RefusedUpload as refused:
            await _answer(send, refused.status, str(refused))

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Let Gradio store the upload (its background move included), then admit the files or refuse them."""
        messages: list[dict] = []

        async def keep(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
        if start["status"] != 200:  # Gradio refused it (too large a file, a malformed form): pass that on
            for message in messages:
                await send(message)
            return
        paths = self.store.admit(json.loads(body))
        await _answer(send, 200, json.dumps(paths), "application/json")


def _too_large(limit: int) -> RefusedUpload:
    return RefusedUpload(f"Request body too large: the demo takes at most {limit:,} bytes per request.", 413)


def _bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that raises [`RefusedUpload`] once the body passes `limit` bytes (a body may be streamed
    without a Content-Length)."""
    received = 0

    async def bounded() -> dict:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large(limit)
        return message

    return bounded


async def _answer(send: Send, status: int, text: str, media_type: str = "text/plain; charset=utf-8") -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
