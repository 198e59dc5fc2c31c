"""Compressed `.npz` bombs (arrays of zeros whose `.npy` headers declare gigabytes) and a capped Python process to
open them in, so that a check that decompresses first fails the test instead of taking the machine."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

BLOCK = bytes(1 << 24)


def write_npz_bomb(path: Path, arrays: dict[str, tuple[tuple[int, ...], str]]) -> Path:
    """An `.npz` of zero arrays, `name: (shape, dtype)`, deflated: a few MB on disk per GB declared."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, (shape, dtype) in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                              "shape": shape})
                left = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                while left > 0:
                    member.write(BLOCK[: min(left, len(BLOCK))])
                    left -= len(BLOCK)
    return path


def run_capped(code: str, address_space: int, timeout: float = 300) -> dict:
    """Run `code` (which sets `result`, a JSON-able value) in a fresh Python whose address space is capped at
    `address_space` bytes; returns `{"result": ..., "error": "<type>: <message>", "peak_rss_mb": ...}`."""
    script = (
        "import json, traceback\n"
        "out = {}\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.strip().splitlines()) +
        "    out['result'] = result\n"
        "except BaseException as error:\n"
        "    out['error'] = f'{type(error).__name__}: {error}'\n"
        # VmHWM is this address space's peak; ru_maxrss would carry the forking test process's RSS across exec.
        "out['peak_rss_mb'] = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) / 1024\n"
        "print('RESULT' + json.dumps(out))\n"
    )

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, preexec_fn=cap)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, f"the capped process died (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT"):])
