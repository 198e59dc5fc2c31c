"""scripts/gpu_onnx_cuda.sh: a wheel travels in parts, is reassembled, verified and installed with `--target`; without
a GPU the benchmarks say so, run nothing and write no results. A small real wheel stands in for onnxruntime-gpu."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ddpm_plugin.export.providers import library_load_problem

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_onnx_cuda.sh"
WHEEL_NAME = "ddpm_fake_probe-1.0-py3-none-any.whl"


def build_wheel(folder: Path) -> Path:
    """A pure-Python wheel with a RECORD, and an uncompressed payload large enough to need several parts."""
    files = {
        "ddpm_fake_probe/__init__.py": b"VALUE = 42\n",
        "ddpm_fake_probe/payload.bin": os.urandom(5000),
        "ddpm_fake_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ddpm-fake-probe\nVersion: 1.0\n",
        "ddpm_fake_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for name, data in files.items()]
    files["ddpm_fake_probe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\nddpm_fake_probe-1.0.dist-info/RECORD,,\n").encode()
    wheel = folder / WHEEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def setup(tmp_path):
    wheel = build_wheel(tmp_path / "here")
    manifest = tmp_path / "wheels.sha256"
    manifest.write_text(f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {WHEEL_NAME}\n")
    env = dict(os.environ, DDPM_WHEEL_MANIFEST=str(manifest), DDPM_WHEEL_PARTS=str(tmp_path / "device-parts"),
               DDPM_WHEEL_TARGET=str(tmp_path / "site"), DDPM_PART_SIZE="2K", PYTHON=sys.executable,
               DDPM_RESULTS=str(tmp_path / "onnx_cuda.md"))
    env.pop("OUT", None)
    return wheel, manifest, env, tmp_path


def script(env: dict, *args: str, timeout: int = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def split_and_receive(wheel: Path, env: dict, tmp_path: Path) -> list[Path]:
    result = script(env, "split", str(wheel), str(tmp_path / "parts"))
    assert result.returncode == 0, result.stderr
    parts = sorted((tmp_path / "parts").glob(f"{WHEEL_NAME}.part-*"))
    for part in parts:  # one transfer each: the command only copies its part out of the repository
        assert script(env, "receive", part.name, cwd=part.parent).returncode == 0  # a path relative to the caller
    return parts


def test_parts_are_reassembled_verified_and_installed_with_target(setup):
    wheel, _, env, tmp_path = setup
    parts = split_and_receive(wheel, env, tmp_path)
    assert len(parts) >= 3 and all(part.stat().st_size <= 2048 for part in parts)
    assert sorted(p.name for p in (tmp_path / "device-parts").glob("*.part-*")) == [p.name for p in parts]
    result = script(env, "install")
    assert result.returncode == 0, result.stderr
    assert f"verified: {WHEEL_NAME}" in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import ddpm_fake_probe; print(ddpm_fake_probe.__file__, ddpm_fake_probe.VALUE)"],
                           capture_output=True, text=True, env=dict(env, PYTHONPATH=str(tmp_path / "site")))
    assert probe.stdout.split() == [str(tmp_path / "site" / "ddpm_fake_probe" / "__init__.py"), "42"]


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_missing_or_damaged_part_is_refused_and_nothing_is_installed(setup, damage):
    wheel, manifest, env, tmp_path = setup
    parts = split_and_receive(wheel, env, tmp_path)
    middle = tmp_path / "device-parts" / f"{WHEEL_NAME}.part-ab"
    if damage == "missing":
        middle.unlink()
    else:
        data = bytearray(middle.read_bytes())
        data[100] ^= 1
        middle.write_bytes(bytes(data))
    result = script(env, "install")
    assert result.returncode == 1
    assert f"gpu_onnx_cuda: run: SHA-256 of {WHEEL_NAME} (from {len(parts) - (damage == 'missing')} file(s)" in result.stderr
    assert "a part is missing or damaged" in result.stderr
    assert not (tmp_path / "site").exists()


def test_a_wheel_that_never_arrived_is_named(setup):
    wheel, manifest, env, tmp_path = setup
    split_and_receive(wheel, env, tmp_path)
    manifest.write_text(manifest.read_text() + f"{'0' * 64}  other-1.0-py3-none-any.whl\n")
    result = script(env, "install")
    assert result.returncode == 1
    assert "run: other-1.0-py3-none-any.whl has not arrived" in result.stderr


def test_split_refuses_a_wheel_the_manifest_does_not_pin(setup):
    wheel, manifest, env, tmp_path = setup
    manifest.write_text(f"{'0' * 64}  {WHEEL_NAME}\n")
    result = script(env, "split", str(wheel), str(tmp_path / "parts"))
    assert result.returncode == 1 and "split: SHA-256 of" in result.stderr
    assert not (tmp_path / "parts").exists()


def test_the_committed_manifest_pins_onnxruntime_gpu_for_cuda_13_and_diffusers():
    names = [line.split()[1] for line in (REPO / "scripts" / "gpu_wheels.sha256").read_text().splitlines()]
    assert names == ["onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", "diffusers-0.42.1-py3-none-any.whl"]


@pytest.mark.skipif(library_load_problem("libcuda.so.1") is None, reason="this machine has an NVIDIA driver")
def test_run_without_a_gpu_installs_then_says_so_and_writes_no_results(setup):
    wheel, _, env, tmp_path = setup
    split_and_receive(wheel, env, tmp_path)
    result = script(env, "run", timeout=300)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if line.startswith("no CUDA device found: torch")]
    assert len(said) == 2 and all("so nothing was run" in line for line in said)  # onnx_cuda.py, cuda_pytorch.py
    assert "no results" in result.stdout
    assert not (tmp_path / "onnx_cuda.md").exists()


@pytest.mark.slow
def test_the_benchmark_table_and_end_to_end_run_on_cpu_with_the_digits_model(monkeypatch):
    """The measuring code of benchmarks/onnx_cuda.py, run on the CPU providers so that a GPU run meets no bug in it."""
    import argparse
    import importlib.util
    import time

    import torch

    from ddpm_plugin.bundled import DIGITS_MODEL

    spec = importlib.util.spec_from_file_location("onnx_cuda_benchmark", REPO / "benchmarks" / "onnx_cuda.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "PARITY_STEPS", 3)  # a shorter comparison than on the GPU
    rows = [
        bench.Row("PyTorch", "float32, eager", lambda: bench.TorchSampler(DIGITS_MODEL, torch.float32, compile=False, device="cpu")),
        bench.Row("onnxruntime fp32", "session.run, NumPy feeds", lambda: bench.OrtSampler(DIGITS_MODEL / "onnx", False, False, device="cpu")),
        bench.Row("onnxruntime fp32", "IO binding", lambda: bench.OrtSampler(DIGITS_MODEL / "onnx", False, True, device="cpu")),
        bench.Row("onnxruntime fp32", "IO binding + CUDA graph", lambda: bench.OrtSampler(DIGITS_MODEL / "onnx", True, True, device="cpu")),
    ]
    args = argparse.Namespace(batch_sizes=[2], steps=2, repeats=1, end_to_end_batch=2, end_to_end_steps=3)
    table, kept = bench.measure(rows, args, deadline=time.monotonic() + 300)
    assert table[0].startswith("| engine | mode | batch 2 (ms/step) | max abs diff vs PyTorch fp32")
    cells = [line.split(" | ") for line in table[2:]]
    assert [c[1] for c in cells] == ["float32, eager", "session.run, NumPy feeds", "IO binding", "IO binding + CUDA graph"]
    assert float(cells[0][3].rstrip(" |")) == 0
    assert all(float(c[3].rstrip(" |")) < 1e-3 for c in cells[1:3]), table  # the ONNX samples match PyTorch's
    assert all(float(c[2]) > 0 for c in cells[:3]), table
    assert "failed: ValueError: `cuda_graph=True` needs the CUDA execution provider" in cells[3][2]  # and the table goes on
    lines = bench.run_end_to_end(kept, args)
    assert lines[1].startswith("- onnxruntime fp32, ") and lines[1].endswith(" s")
    assert lines[2] == "- PyTorch: not run (no PyTorch row ran at batch 2)"
