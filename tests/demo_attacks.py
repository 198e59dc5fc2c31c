"""Hostile requests against a running demo server, as an attacker would send them: decompression bombs, junk
uploads, oversized bodies, wrong types, server paths passed as pictures, too few arguments, and links in the
served export folder (`web_page_answers`).

`python tests/demo_attacks.py URL` runs each once and prints a table of what the server answered; the tests in
`test_demo_server.py` assert on the same functions.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

BOMB_SIDE = 13_000  # a 13,000 x 13,000 RGB PNG: 0.49 MB on disk, 507 MB decoded
TIMEOUT = 120


def decompression_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid all-black RGB PNG of `side` x `side` pixels, written row by row (never held decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, idat = zlib.compressobj(9), []
    row = b"\x00" * (1 + 3 * side)  # filter byte 0, then black pixels
    for _ in range(side):
        idat.append(compressor.compress(row))
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))
    return path


def small_picture(seed: int = 0, side: int = 24) -> bytes:
    """A random grey PNG, distinct for every seed."""
    pixels = (np.random.default_rng(seed).random((side, side)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


JUNK_UPLOADS = {
    "page.html": b"<html><body><script>alert(document.cookie)</script></body></html>",
    "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
    "tool.bin": bytes(range(256)) * 64,
    "notes.png": b"this is text, named like a picture\n",
}


@dataclass
class Answer:
    status: int
    text: str


def upload(url: str, files: dict[str, bytes]) -> Answer:
    """POST `files` to Gradio's upload route in one request."""
    response = httpx.post(f"{url}/gradio_api/upload", files=[("files", (name, content)) for name, content in files.items()],
                          timeout=TIMEOUT)
    return Answer(response.status_code, response.text)


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def call(url: str, api_name: str, data: list) -> Answer:
    """Run a named endpoint through the queue as a browser does; the answer's text is the completion event."""
    session = uuid.uuid4().hex
    # json.dumps writes NaN and Infinity as Python's JSON reader (and the server's) takes them; httpx's would refuse.
    body = json.dumps({"data": data, "fn_index": fn_index(url, api_name), "session_hash": session})
    join = httpx.post(f"{url}/gradio_api/queue/join", content=body, timeout=TIMEOUT,
                      headers={"content-type": "application/json"})
    if join.status_code != 200:
        return Answer(join.status_code, join.text)
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=TIMEOUT) as stream:
        for line in stream.iter_lines():
            if "process_completed" in line:
                event = json.loads(line.removeprefix("data:"))
                return Answer(200 if event.get("success") else 400, json.dumps(event["output"]))
    return Answer(0, "the stream ended without a completion")


_FN_INDEX: dict[tuple[str, str], int] = {}


def fn_index(url: str, api_name: str) -> int:
    if (url, api_name) not in _FN_INDEX:
        config = httpx.get(f"{url}/config", timeout=TIMEOUT).json()
        for k, dependency in enumerate(config["dependencies"]):
            _FN_INDEX[(url, dependency["api_name"])] = dependency.get("id", k)
    return _FN_INDEX[(url, api_name)]


def bits_per_dim_of_upload(url: str, model: str, content: bytes, name: str = "digit.png") -> tuple[Answer, Answer]:
    """Upload `content`, then ask for its bits/dim: (the upload's answer, the request's answer)."""
    uploaded = upload(url, {name: content})
    if uploaded.status != 200:
        return uploaded, Answer(0, "not sent")
    (path,) = json.loads(uploaded.text)
    return uploaded, call(url, "bits_per_dim", [model, file_data(path), 0])


def server_pictures(workdir: Path, server_cwd: Path) -> dict[str, dict]:
    """Picture values that name files of the server instead of an upload: an existing picture (absolute and
    relative to the server's working folder), a file that is not one, a missing one, and paths that climb out of
    Gradio's folder; each plain and tagged as Gradio's own file object. Writes the picture it names."""
    secret = workdir / "secret.png"
    secret.write_bytes(small_picture(seed=1234))
    (server_cwd / "secret.png").write_bytes(small_picture(seed=4321))
    paths = {
        "absolute picture": str(secret), "relative picture": "secret.png", "/etc/passwd": "/etc/passwd",
        "/etc/shadow": "/etc/shadow", "missing file": str(workdir / "no-such-picture.png"),
        "climbing path": "../../../../../../etc/passwd", "empty path": "",
    }
    values = {name: {"path": path} for name, path in paths.items()}
    values.update({f"{name} (tagged)": file_data(path) for name, path in paths.items() if path})
    values["a number"] = 7
    values["a list"] = [str(secret)]
    return values


def picture_call(url: str, model: str, api_name: str, picture: object) -> Answer:
    """`/bits_per_dim` or `/interpolate` with `picture` as every picture input."""
    if api_name == "interpolate":
        return call(url, "interpolate", [model, picture, picture, 10, 3, 0])
    return call(url, "bits_per_dim", [model, picture, 0])


def oversized_json(url: str, megabytes: int = 30) -> Answer:
    body = json.dumps({"data": ["x" * (megabytes * 2**20)], "fn_index": 0, "session_hash": "big"}).encode()
    response = httpx.post(f"{url}/gradio_api/queue/join", content=body, timeout=TIMEOUT,
                          headers={"content-type": "application/json"})
    return Answer(response.status_code, response.text[:300])


GENERATE_DEFAULTS = ["onnxruntime", "ddim", "fixed_large", 10, 2, 0, 0.0]


def generate(url: str, model: str, **changes) -> Answer:
    """`/generate` with the defaults above, some replaced (keys: backend, sampler, variance, steps, images, seed,
    eta)."""
    names = ["backend", "sampler", "variance", "steps", "images", "seed", "eta"]
    values = dict(zip(names, GENERATE_DEFAULTS))
    values.update(changes)
    return call(url, "generate", [model, *(values[name] for name in names)])


def web_get(url: str, path: str) -> Answer:
    """GET `path` (sent as written, `%2e%2e` included) below the browser page `/web/`."""
    response = httpx.get(f"{url}/web/{path}", timeout=TIMEOUT)
    return Answer(response.status_code, response.text[:300] if response.status_code != 200 else "")


WEB_ATTACKS = ("%2e%2e/%2e%2e/%2e%2e/etc/passwd", "model/scheduler/scheduler_config.json", "model/%2e%2e/%2e%2e/app.py",
               "..%2f..%2fsite.py")


def too_few_arguments(url: str, model: str) -> Answer:
    return call(url, "generate", [model])


def main(url: str, model: str, workdir: Path) -> None:
    bomb = decompression_bomb(workdir / "bomb.png").read_bytes()
    pictures = server_pictures(workdir, workdir)
    attacks = {
        "13,000 x 13,000 PNG (0.49 MB) to /bits_per_dim": lambda: bits_per_dim_of_upload(url, model, bomb)[0],
        **{f"upload {name}": (lambda n=name, c=content: upload(url, {n: c})) for name, content in JUNK_UPLOADS.items()},
        "three 1.9 MB files in one upload": lambda: upload(url, {f"{k}.png": b"\0" * 1_990_000 for k in range(3)}),
        "30 MB JSON body": lambda: oversized_json(url),
        "5 MB model name": lambda: generate(url, "m" * 5 * 2**20),
        "steps NaN": lambda: generate(url, model, steps=float("nan")),
        "steps 2.5": lambda: generate(url, model, steps=2.5),
        "steps true": lambda: generate(url, model, steps=True),
        "seed 'abc'": lambda: generate(url, model, seed="abc"),
        "images [2]": lambda: generate(url, model, images=[2]),
        "eta inf": lambda: generate(url, model, eta=float("inf"), sampler="ddim"),
        "unknown model": lambda: generate(url, "../pipeline"),
        "too few arguments to /generate": lambda: too_few_arguments(url, model),
        **{f"{name} to /bits_per_dim": (lambda p=picture: picture_call(url, model, "bits_per_dim", p))
           for name, picture in pictures.items()},
        **{f"GET /web/{path}": (lambda p=path: web_get(url, p)) for path in WEB_ATTACKS},
    }
    print("| attack | status | answer |\n|---|---:|---|")
    for name, attack in attacks.items():
        answer = attack()
        print(f"| {name} | {answer.status} | {answer.text[:120]!r} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "pipeline", Path(sys.argv[3] if len(sys.argv) > 3 else "."))
