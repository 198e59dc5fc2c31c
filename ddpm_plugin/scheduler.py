"""The paper's `DDPMScheduler` configuration (Ho et al. 2020, Sec. 4), with the validation stock lacks."""

from __future__ import annotations

from typing import Any

from diffusers import DDPMScheduler

from .pipelines.gaussian_diffusion import SCHEDULER_OPTIONS, GaussianDiffusion
from .presets import get_preset

# T=1000, beta_1=1e-4 .. beta_T=0.02 linearly, eps-prediction, x_0 clipped to [-1, 1] while sampling.
PAPER_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}


def paper_scheduler(preset: str = "cifar10", **overrides: Any) -> DDPMScheduler:
    """A stock `DDPMScheduler` configured as in the paper for `preset`.

    `variance_type` is `"fixed_large"` (sigma_t^2 = beta_t, the official CIFAR-10 sampler) for cifar10 and the
    small presets, `"fixed_small"` (sigma_t^2 = beta_tilde_t) for the 256x256 presets. `overrides` replace
    `DDPMScheduler` arguments and are checked against the allow-list that training, the bound and ONNX sampling
    share (`ddpm_plugin.pipelines.gaussian_diffusion.SCHEDULER_OPTIONS`): a setting they do not model, such as
    `thresholding=True` or `rescale_betas_zero_snr=True`, is refused rather than followed by sampling alone.

    Example:

    ```py
    >>> from ddpm_plugin import paper_scheduler
    >>> paper_scheduler("celebahq").config.variance_type
    'fixed_small'
    ```
    """
    config = {**PAPER_SCHEDULER_CONFIG, "variance_type": get_preset(preset).variance_type, **overrides}
    unknown = set(overrides) - set(SCHEDULER_OPTIONS)
    if unknown:
        raise ValueError(f"unknown `DDPMScheduler` arguments: {sorted(unknown)}.")
    GaussianDiffusion.from_config(config)  # raises for a setting the float64 schedule does not model
    return DDPMScheduler(**config)
