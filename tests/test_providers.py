"""Provider choice: a CPU machine runs quietly on CPU, and a CUDA provider that cannot load says which library is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_plugin.export.providers import CUDA_REQUIREMENT, check_cuda, library_load_problem, preload_cuda_libraries

REPO = Path(__file__).resolve().parents[1]


def test_a_loadable_library_has_no_problem():
    assert library_load_problem("libc.so.6") is None


def test_a_missing_library_is_named():
    assert library_load_problem("libddpm_no_such_library.so.3") == (
        "libddpm_no_such_library.so.3 is missing (not on the library path nor in an nvidia-* wheel)"
    )


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build a library with a missing dependency")
def test_a_library_whose_dependency_is_missing_names_the_dependency(tmp_path):
    """As ORT's CUDA provider library does when libcublasLt is absent: the message names the dependency."""
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "provider.c").write_text("int dep(void);\nint provider(void) { return dep(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", "libddpm_dep.so.7", "-Wl,-soname,libddpm_dep.so.7", "dep.c"], cwd=tmp_path, check=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", "libprovider.so", "provider.c", "libddpm_dep.so.7"], cwd=tmp_path, check=True)
    (tmp_path / "libddpm_dep.so.7").unlink()
    assert library_load_problem(tmp_path / "libprovider.so").startswith("libddpm_dep.so.7 is missing")


@pytest.mark.skipif(library_load_problem("libcuda.so.1") is None, reason="this machine has an NVIDIA driver")
def test_without_a_driver_the_reason_says_no_cuda_device_was_found():
    assert check_cuda() == check_cuda().__class__(False, "no CUDA device found: the NVIDIA driver (libcuda.so.1) is not installed")


def test_the_cuda_requirement_names_both_cuda_versions():
    assert "1.20-1.26 for CUDA 12" in CUDA_REQUIREMENT and ">= 1.28 for CUDA 13" in CUDA_REQUIREMENT


def test_preloading_prints_nothing():
    code = "from ddpm_plugin.export.providers import preload_cuda_libraries; preload_cuda_libraries()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    preload_cuda_libraries()  # and twice in one process is harmless


GPU_BUILD = os.environ.get("DDPM_ONNXRUNTIME_GPU_PATH")


@pytest.mark.skipif(not GPU_BUILD, reason="set DDPM_ONNXRUNTIME_GPU_PATH to a `pip install --target` folder of onnxruntime-gpu")
def test_onnxruntime_gpu_without_cuda_runs_quietly_on_cpu():
    """onnxruntime-gpu lists CUDAExecutionProvider here; preloading and `auto` must still choose the CPU without a word."""
    code = (
        "import onnxruntime as ort, sys\n"
        "from ddpm_plugin.bundled import DIGITS_MODEL\n"
        "from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline\n"
        "from ddpm_plugin.export.providers import check_cuda, preload_cuda_libraries\n"
        "assert 'CUDAExecutionProvider' in ort.get_available_providers() and hasattr(ort, 'preload_dlls'), ort.__file__\n"
        "preload_cuda_libraries()  # finds no CUDA library here, and says nothing\n"
        "pipe = OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL / 'onnx')\n"
        "pipe(batch_size=1, num_inference_steps=2, seed=0, progress_bar=False)\n"
        "print(pipe.providers, check_cuda().usable)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [GPU_BUILD, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    if "True" not in result.stdout:
        assert (result.stdout, result.stderr) == ("['CPUExecutionProvider'] False\n", "")
