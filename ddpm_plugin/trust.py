"""The one way in for untrusted files and folders: pipeline folders, ONNX exports, sample folders, `.npz` data
sets and statistics, JSON manifests and configs, the demo's web page and the Space writer all read through here.

What it guarantees before a byte of content is read or a buffer allocated:
- a file named by an untrusted folder or manifest lies inside that folder, is reached through no link, and is a
  regular file (never a device, a FIFO or a socket, which would hang or never end);
- an `.npz` array's shape and dtype come from its `.npy` header, so an array too large for this machine is
  refused before it is decompressed;
- a size declared by a config is checked against the memory this process can have before anything is built;
- what is hashed is exactly what is loaded, and what is written is written whole or not at all.

Torch-free and onnxruntime-free: it needs only NumPy.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np

TEMP_SUFFIX = ".partial"
MAX_JSON_BYTES = 16 << 20  # configs, manifests and metadata are small; a larger one is refused unread
BLOCK = 1 << 20


class UntrustedInputError(ValueError):
    """A file, folder or value from outside failed a check; the message names it and the rule it broke."""


def memory_budget() -> int:
    """Bytes one allocation may take: half of what this process can still get (the physical memory available,
    under the address-space limit `prlimit`/`ulimit -v` set, when one is set)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 1 << 34
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        available = min(available, soft)
    return available // 2


def check_allocation(num_bytes: int, what: str) -> None:
    """`UntrustedInputError` when `num_bytes` (for `what`, e.g. "unet/config.json `sample_size` 4000") is more
    than this process can hold."""
    budget = memory_budget()
    if num_bytes > budget:
        raise UntrustedInputError(
            f"{what} needs {num_bytes / 2**30:.1f} GiB, more than this machine can hold ({budget / 2**30:.1f} GiB "
            f"for one allocation)."
        )


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISLNK(mode):
        raise UntrustedInputError(f"{path} is a link; only regular files are read.")
    if not stat.S_ISREG(mode):
        raise UntrustedInputError(f"{path} is not a regular file (a device, FIFO or socket); only regular files are read.")


def regular_file(folder: str | os.PathLike, name: str | os.PathLike, *, what: str = "file") -> Path:
    """`folder / name` when `name` is a relative path inside `folder`, no component below `folder` is a link, and
    the file is a regular file; otherwise `UntrustedInputError` (or `FileNotFoundError` when it is absent).

    `folder` itself is the caller's choice and may be reached through a link; what it names may not leave it.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise UntrustedInputError(f"{what} must be a file name, got {name!r}.")
    relative = PurePosixPath(os.fspath(name))
    if relative.is_absolute() or not relative.parts or any(part in ("..", "") for part in relative.parts) or "\\" in str(relative):
        raise UntrustedInputError(f"{what} {str(name)!r} must be a relative path inside {folder}.")
    path = Path(folder)
    for depth, part in enumerate(relative.parts, start=1):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file.") from None
        if stat.S_ISLNK(mode):
            if depth == len(relative.parts) and hub_cache_blob(path):
                mode = path.stat().st_mode
                continue
            raise UntrustedInputError(f"{path} is a link; only regular files inside {folder} are read.")
    _check_regular(path, mode)
    return path


def hub_cache_blob(link: Path) -> bool:
    """Whether `link` is a file of a Hugging Face cache snapshot (`REPO/snapshots/REVISION/...`) linked, as the
    cache keeps every such file, to a regular file directly in that repository's own `REPO/blobs/` folder."""
    parts = link.absolute().parts
    if "snapshots" not in parts[:-2]:
        return False
    repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
    blobs = repo / "blobs"
    if blobs.is_symlink() or not blobs.is_dir():
        return False
    target = Path(os.path.realpath(link))
    return target.parent == Path(os.path.realpath(blobs)) and target.is_file() and not target.is_symlink()


def regular_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Every file below `folder`, in sorted order; `UntrustedInputError` at the first link or special file (a
    Hugging Face cache snapshot's links into its blob store are its files, see [`hub_cache_blob`])."""
    folder = Path(folder)
    for entry in sorted(folder.iterdir()):
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            yield from regular_files(entry)
        else:
            if not (stat.S_ISLNK(mode) and hub_cache_blob(entry)):
                _check_regular(entry, mode)
            yield entry


def check_no_links(folder: str | os.PathLike) -> None:
    """`UntrustedInputError` naming the first link or special file below `folder`."""
    for _ in regular_files(folder):
        pass


def _open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refusing (without blocking) anything but a regular file (or a Hugging Face
    cache snapshot's link into its blob store, see [`hub_cache_blob`])."""
    if os.path.islink(path) and hub_cache_blob(Path(path)):
        path = Path(os.path.realpath(path))
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        if os.path.islink(path):
            raise UntrustedInputError(f"{path} is a link; only regular files are read.") from None
        raise error
    try:
        _check_regular(path, os.fstat(descriptor).st_mode)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a regular file, read in 1 MiB blocks; `UntrustedInputError` for a link or special file."""
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(Path(path)), "rb") as file:
        for block in iter(lambda: file.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The content of a regular file of at most `max_bytes`; `UntrustedInputError` otherwise, before reading."""
    path = Path(path)
    with os.fdopen(_open_regular(path), "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > max_bytes:
            raise UntrustedInputError(f"{path} is {size:,} bytes, more than the {max_bytes:,} such a file may have.")
        return file.read(max_bytes + 1)[:max_bytes]


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON document in a regular file of at most `max_bytes`; `UntrustedInputError` naming the file when it is
    not one or does not parse."""
    try:
        return json.loads(read_bytes(path, max_bytes))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UntrustedInputError(f"{path} is not valid JSON: {error}") from None


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The shape and dtype of every array in an `.npz` file, read from the `.npy` headers only (nothing is
    decompressed beyond them). `UntrustedInputError` for a damaged archive, an object array, or a member whose
    stored size does not fit its header."""
    path = Path(path)
    descriptor = _open_regular(path)
    headers = {}
    try:
        with os.fdopen(descriptor, "rb") as file, zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
                    header_size = member.tell()
                if dtype.hasobject:
                    raise UntrustedInputError(f"{path}: `{info.filename[:-4]}` holds Python objects; only numbers are read.")
                if info.file_size != header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                    raise UntrustedInputError(f"{path}: `{info.filename[:-4]}` is damaged (its size does not match its header).")
                headers[info.filename[:-4]] = (tuple(shape), dtype)
    except UntrustedInputError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as error:
        raise UntrustedInputError(f"{path}: unreadable .npz file ({error}).") from None
    return headers


def load_npz(
    path: str | os.PathLike,
    check: Callable[[dict[str, tuple[tuple[int, ...], np.dtype]]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, never unpickled. The headers are read first: `check(headers)` may refuse
    them (raising), and the total size is checked against this machine's memory before anything is decompressed.
    A damaged member raises `UntrustedInputError` naming the file."""
    headers = npz_headers(path)
    if check is not None:
        check(headers)
    total = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in headers.values())
    check_allocation(total, str(path))
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in headers}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as error:
        raise UntrustedInputError(f"{path}: unreadable .npz file ({error}).") from None


def write_atomically(path: str | os.PathLike, content: bytes | str | Callable[[Any], None]) -> None:
    """Write `content` (bytes, text, or a function that writes to a binary file) to a temporary file beside
    `path`, sync it and rename it over `path`: a kill or a full disk leaves the previous file as it was."""
    path = Path(path)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(descriptor, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode() if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, document: Any, indent: int | None = 1) -> None:
    """`document` as JSON in `path`, atomically (see [`write_atomically`])."""
    write_atomically(path, json.dumps(document, indent=indent) + "\n")
