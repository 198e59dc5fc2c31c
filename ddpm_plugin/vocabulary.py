"""The words ddpm-plugin's modules share, each defined once: samplers, backends, variance types, the names of
the files and folders a pipeline folder holds, and the checks that refuse any other value with a message.

Torch-free (the standard library, and NumPy through `gaussian_diffusion`): the ONNX Runtime sampler, the demo
and the command line import it. `VarianceType` itself lives in `pipelines/gaussian_diffusion.py`, because the
pipeline's files are copied into every saved folder and load there without ddpm-plugin installed.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Literal, get_args

from .pipelines.gaussian_diffusion import VarianceType

__all__ = [
    "BACKENDS", "BF16_FLOAT32_BELOW_T", "Backend", "ONNX_BACKENDS", "PRECISIONS", "Precision", "ONNX_FLOAT32_MODEL_FILE", "ONNX_METADATA_FILE", "ONNX_MODEL_FILE", "ONNX_SUBFOLDER", "PAPER_VARIANCE_TYPES",
    "PIPELINE_MODULE", "PaperVarianceType", "SAMPLERS", "SAMPLERS_WITHOUT_ETA", "SAMPLER_NAMES", "SCHEDULER_CONFIG", "Sampler", "TRAINING_CONFIG_FILE",
    "TRAINING_RUN_FILE", "VarianceType",
    "check_eta", "check_sampler", "check_steps",
]

# "ddpm": ancestral sampling (Algorithm 2) with the paper's `DDPMScheduler`; "ddim": Song et al. (2021) with a
# `DDIMScheduler` of the same training schedule; "dpmsolver++": Lu et al. (2022), second-order multistep in data
# prediction, with a `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)` of it.
Sampler = Literal["ddpm", "ddim", "dpmsolver++"]
SAMPLERS: tuple[Sampler, ...] = get_args(Sampler)
# The samplers without DDIM's stochasticity `eta` (it must be 0 with them).
SAMPLERS_WITHOUT_ETA: tuple[Sampler, ...] = ("ddpm", "dpmsolver++")
SAMPLER_NAMES: dict[Sampler, str] = {"ddpm": "DDPM", "ddim": "DDIM", "dpmsolver++": "DPM-Solver++"}  # in messages
Backend = Literal["onnxruntime", "openvino", "pytorch"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
ONNX_BACKENDS: tuple[Backend, ...] = ("onnxruntime", "openvino")  # the backends that run a model's ONNX export
# The network's precision a sampler may be asked for: float32, or bfloat16 (OpenVINO's inference precision, or
# PyTorch's bf16 weights), which runs float32 for t < BF16_FLOAT32_BELOW_T, where the bound weighs reduced
# precision most (docs/results/precision_quality_mnist.md).
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
BF16_FLOAT32_BELOW_T = 10
# The paper's two sigma_t^2 (Sec. 3.2), which the presets and the demo offer; `VarianceType` adds diffusers'
# spelling "fixed_small_log" of beta_tilde_t, which a scheduler configuration may hold.
PaperVarianceType = Literal["fixed_large", "fixed_small"]
PAPER_VARIANCE_TYPES: tuple[PaperVarianceType, ...] = get_args(PaperVarianceType)

PIPELINE_MODULE = "pipeline_ddpm_paper"  # the pipeline's file in a saved folder: `custom_pipeline=PIPELINE_MODULE`
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"  # in a pipeline folder and in an ONNX export
ONNX_SUBFOLDER = "onnx"  # where a pipeline folder keeps its export (`ddpm export --output DIR/onnx`)
ONNX_MODEL_FILE = "model.onnx"
# An int8 export's float32 graph, run for t < `float32_below_t` (time-step-aware precision).
ONNX_FLOAT32_MODEL_FILE = "model.float32.onnx"
ONNX_METADATA_FILE = "ddpm_onnx.json"
TRAINING_CONFIG_FILE = "training_config.json"  # the settings of a run, in its folder and beside a bundled model
TRAINING_RUN_FILE = "training_run.json"  # beside a bundled model: steps, wall time, command, what was measured


def check_sampler(scheduler: str) -> None:
    """Refuse anything but a [`Sampler`]."""
    if scheduler not in SAMPLERS:
        raise ValueError(f"`scheduler` must be one of {', '.join(map(repr, SAMPLERS))}, got {scheduler!r}.")


def check_eta(scheduler: str, eta: float) -> None:
    """Refuse an `eta` that is not a finite number >= 0, and any `eta` but 0 for a sampler that has none."""
    if not (isinstance(eta, Real) and math.isfinite(eta) and eta >= 0.0):
        raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
    if scheduler in SAMPLERS_WITHOUT_ETA and eta != 0.0:
        raise ValueError(
            f"`eta` is DDIM's; the {SAMPLER_NAMES[scheduler]} sampler has none (got eta={eta}): use scheduler 'ddim' or eta 0."
        )


def check_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    """Refuse a number of denoising steps that is not a whole number in 1..T."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, Integral) or not (
        1 <= num_inference_steps <= num_train_timesteps
    ):
        raise ValueError(
            f"`num_inference_steps` must be an integer in 1..{num_train_timesteps}, got {num_inference_steps!r}."
        )
