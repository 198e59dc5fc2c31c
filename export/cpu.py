"""What this CPU offers the samplers: its physical cores, the instruction sets that decide which kernels run
(AVX-512 and AMX carry the bf16 and int8 rates) and its name. The standard library only: the engine choice and
`ddpm info` read it without onnxruntime, OpenVINO or torch.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Instruction sets that decide which kernels run: AVX-512 and AMX carry the bf16 and int8 rates.
INSTRUCTION_SETS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                    "amx_tile", "amx_bf16", "amx_int8")
# Either gives bf16 matrix products in hardware (AMX tiles, or AVX-512's dot products); without them bf16 is emulated.
BF16_INSTRUCTION_SETS = ("amx_bf16", "avx512_bf16")


def _cpuinfo() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def physical_cpu_count() -> int:
    """Physical cores this process may run on (hyper-threads share a core's FMA units, so they do not help)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores, current = set(), {}
    for line in _cpuinfo().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("physical id", "core id"):
            current[key] = value
        if len(current) == 2:
            cores.add((current["physical id"], current["core id"]))
            current = {}
    return max(1, min(len(cores) or allowed, allowed))


@functools.lru_cache(maxsize=1)
def instruction_sets() -> tuple[str, ...]:
    """The [`INSTRUCTION_SETS`] this CPU reports (its first `flags` line), in that order."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return tuple(name for name in INSTRUCTION_SETS if name in flags)
    return ()


def has_bf16(flags: tuple[str, ...] | None = None) -> bool:
    """Whether the CPU (or the given instruction sets) multiplies bf16 in hardware."""
    return any(name in (instruction_sets() if flags is None else flags) for name in BF16_INSTRUCTION_SETS)


def cpu_name() -> str:
    """The CPU's model name, or the platform's processor string."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"
