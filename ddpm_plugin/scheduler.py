"""The paper's `DDPMScheduler` configuration (Ho et al. 2020, Sec. 4), with the validation stock lacks."""

from __future__ import annotations

import inspect
from typing import Any, get_args

from diffusers import DDPMScheduler

from .pipelines.gaussian_diffusion import BetaSchedule, get_beta_schedule
from .presets import get_preset

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

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
    any `DDPMScheduler` argument and are validated: stock diffusers silently treats an unknown
    `variance_type` as fixed_small and divides by zero on zero steps.

    Example:

    ```py
    >>> from ddpm_plugin import paper_scheduler
    >>> paper_scheduler("celebahq").config.variance_type
    'fixed_small'
    ```
    """
    config = {**PAPER_SCHEDULER_CONFIG, "variance_type": get_preset(preset).variance_type, **overrides}
    unknown = set(overrides) - set(inspect.signature(DDPMScheduler.__init__).parameters)
    if unknown:
        raise ValueError(f"unknown `DDPMScheduler` arguments: {sorted(unknown)}.")
    if config["variance_type"] not in VARIANCE_TYPES:
        raise ValueError(f"`variance_type` must be one of {list(VARIANCE_TYPES)}, got {config['variance_type']!r}.")
    if config["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {config['prediction_type']!r}."
        )
    steps = config["num_train_timesteps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`num_train_timesteps` must be a positive integer, got {steps!r}.")
    if config["beta_schedule"] not in get_args(BetaSchedule):
        raise ValueError(
            f"`beta_schedule` must be one of {list(get_args(BetaSchedule))}, got {config['beta_schedule']!r}."
        )
    if not 0 < config["beta_start"] <= config["beta_end"] < 1:
        raise ValueError(
            f"need 0 < `beta_start` <= `beta_end` < 1, got {config['beta_start']!r} and {config['beta_end']!r}."
        )
    get_beta_schedule(  # raises if the schedule leaves (0, 1)
        config["beta_schedule"], beta_start=config["beta_start"], beta_end=config["beta_end"],
        num_diffusion_timesteps=steps,
    )
    return DDPMScheduler(**config)
