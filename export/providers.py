"""Choosing onnxruntime execution providers and session options, quietly.

`onnxruntime-gpu` lists `CUDAExecutionProvider` even on machines without a GPU or without the CUDA libraries,
and a session asked for it then prints an error to file descriptor 2 before falling back to the CPU. So
`provider="auto"` first checks, with `ctypes` only, that the CUDA driver initialises and sees a device, then
loads the CUDA and cuDNN libraries as onnxruntime would (`onnxruntime.preload_dlls()` where it exists) and ORT's
CUDA provider library; only then does it ask for CUDA. When a library is missing, the reason names it.

This module imports only the standard library and onnxruntime (never torch).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import onnxruntime as ort

from .cpu import physical_cpu_count

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ProviderSpec = Union[str, Sequence[Union[str, tuple[str, dict]]]]
# Which onnxruntime-gpu a CUDA major version needs (1.27 needs CUDA 13 but cannot find the CUDA 13 wheels' libraries).
CUDA_REQUIREMENT = "onnxruntime-gpu 1.20-1.26 for CUDA 12, onnxruntime-gpu >= 1.28 for CUDA 13"
CUDNN_LIBRARY = "libcudnn.so.9"


@dataclass(frozen=True)
class CudaCheck:
    """Whether a CUDA session can be created here, and if not, why."""

    usable: bool
    reason: str


@functools.lru_cache(maxsize=1)
def check_cuda() -> CudaCheck:
    """Check, without printing anything, that ORT's CUDA provider can run on this machine."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return CudaCheck(False, "no CUDA device found: the NVIDIA driver (libcuda.so.1) is not installed")
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return CudaCheck(False, "no CUDA device found: the CUDA driver sees no usable GPU")
    if CUDA not in ort.get_available_providers():
        return CudaCheck(False, f"this onnxruntime build ({ort.__version__}) has no {CUDA}: install {CUDA_REQUIREMENT}")
    preload_cuda_libraries()
    provider_library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    for library in (provider_library, CUDNN_LIBRARY):
        problem = library_load_problem(library)
        if problem:
            built_for = getattr(_build_info(), "cuda_version", None)
            return CudaCheck(False, f"onnxruntime-gpu {ort.__version__}" + (f" (built for CUDA {built_for})" if built_for else "")
                             + f" cannot load its CUDA provider: {problem}; it needs {CUDA_REQUIREMENT}")
    return CudaCheck(True, f"{count.value} CUDA device(s)")


def library_load_problem(library: str | os.PathLike) -> str | None:
    """None when `library` loads; else which library is missing (the library itself or one it needs)."""
    try:
        ctypes.CDLL(str(library))
    except OSError as error:
        missing = re.match(r"(\S+?): cannot open shared object file", str(error))
        if missing:
            return f"{Path(missing.group(1)).name} is missing (not on the library path nor in an nvidia-* wheel)"
        return f"{Path(library).name} does not load ({error})"
    return None


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels, quietly, with `onnxruntime.preload_dlls()` (onnxruntime >= 1.21).

    It looks beside onnxruntime first; then in every folder of the `nvidia` wheels on `sys.path`, which lie
    elsewhere when onnxruntime was installed with `pip install --target`. Libraries already loaded (by
    `import torch`) are found by name and not loaded twice."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    spec = importlib.util.find_spec("nvidia")
    folders = [lib for root in (spec.submodule_search_locations or []) for lib in sorted(Path(root).glob("*/lib"))] if spec else []
    # preload_dlls reports by print() and warnings; a library it cannot find is reported by `check_cuda` instead.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for directory in (None, *map(str, folders)):
            with contextlib.suppress(Exception):
                preload(cuda=True, cudnn=True, directory=directory)


def _build_info():
    try:
        from onnxruntime.capi import build_and_package_info
    except ImportError:
        return None
    return build_and_package_info


def resolve_providers(provider: ProviderSpec = "auto") -> list:
    """The provider list for `ort.InferenceSession`.

    Args:
        provider (`str` or `list`, *optional*, defaults to `"auto"`):
            `"auto"` (CUDA when usable, else CPU), `"cpu"`, `"cuda"`, a provider name, or an explicit list of
            names or `(name, options)` pairs as onnxruntime takes them.
    """
    if isinstance(provider, str):
        aliases = {"cpu": [CPU], "cuda": [CUDA, CPU]}
        if provider == "auto":
            return [CUDA, CPU] if check_cuda().usable else [CPU]
        providers = aliases.get(provider.lower(), [provider])
    else:
        providers = list(provider)
    if not providers:
        raise ValueError("`provider` must name at least one execution provider.")
    available = ort.get_available_providers()
    for entry in providers:
        name = entry[0] if isinstance(entry, (tuple, list)) else entry
        if name == CUDA and not check_cuda().usable:  # also on a CPU-only build: the reason says which
            raise ValueError(f"`provider` asks for {CUDA}, but CUDA is not usable here: {check_cuda().reason}.")
        if name not in available:
            raise ValueError(f"`provider` {name!r} is not available in onnxruntime {ort.__version__}; available: {available}.")
    return providers


def session_options(num_threads: int | None = None) -> ort.SessionOptions:
    """All graph optimisations (including the NCHWc layout on CPU), one intra-op thread per physical core,
    no spinning."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = num_threads or physical_cpu_count()
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning, which steals shared cores: docs/results/sampling_benchmark_batch1.md.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings here are about fallbacks we chose on purpose
    return options
