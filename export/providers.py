"""Choosing onnxruntime execution providers and session options, quietly.

`onnxruntime-gpu` lists `CUDAExecutionProvider` even on machines without a GPU or without the CUDA libraries,
and a session asked for it then prints an error to file descriptor 2 before falling back to the CPU. So
`provider="auto"` first checks, with `ctypes` only, that the CUDA driver initialises, sees a device, and that
ORT's CUDA provider library and cuDNN load; only then does it ask for CUDA.

This module imports only the standard library and onnxruntime (never torch).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ProviderSpec = Union[str, Sequence[Union[str, tuple[str, dict]]]]


@dataclass(frozen=True)
class CudaCheck:
    """Whether a CUDA session can be created here, and if not, why."""

    usable: bool
    reason: str


@functools.lru_cache(maxsize=1)
def check_cuda() -> CudaCheck:
    """Check, without printing anything, that ORT's CUDA provider can run on this machine."""
    if CUDA not in ort.get_available_providers():
        return CudaCheck(False, f"this onnxruntime build ({ort.__version__}) has no {CUDA}")
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return CudaCheck(False, f"no CUDA driver (libcuda.so.1): {error}")
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return CudaCheck(False, "the CUDA driver found no usable GPU")
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:  # loads CUDA/cuDNN from nvidia-* wheels when installed; it reports by print()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            preload(cuda=True, cudnn=True)
    provider_library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    for library in (str(provider_library), "libcudnn.so.9"):
        try:
            ctypes.CDLL(library)
        except OSError as error:
            return CudaCheck(False, f"a CUDA library does not load: {error}")
    return CudaCheck(True, f"{count.value} CUDA device(s)")


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


def physical_cpu_count() -> int:
    """Physical cores this process may run on (hyper-threads share a core's FMA units, so they do not help)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, current = set(), {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("physical id", "core id"):
                current[key] = value
            if len(current) == 2:
                cores.add((current["physical id"], current["core id"]))
                current = {}
        physical = len(cores) or allowed
    except OSError:
        physical = allowed
    return max(1, min(physical, allowed))


def session_options(num_threads: int | None = None) -> ort.SessionOptions:
    """All graph optimisations (including the NCHWc layout on CPU), one intra-op thread per physical core,
    no spinning."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = num_threads or physical_cpu_count()
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: on shared cores (a demo serving several requests, CI, a busy
    # laptop) spinning threads steal the cores the work needs. Measured on 2 busy cores, 2 threads: digits
    # step 2.3 -> 1.4 ms, cifar10 step 310 -> 222 ms.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings here are about fallbacks we chose on purpose
    return options
