"""The float64 sampling coefficients of an ONNX export, written beside it as JSON for samplers outside Python.

The browser sampler (`demo/web/`) runs the same denoising loop as [`OnnxDDPMPipeline`] in JavaScript. It must
not re-type the schedule: it reads the arrays [`GaussianDiffusion`] computes from the export's own
`scheduler/scheduler_config.json`, and the scheduler settings that choose the timesteps and the step rule.
JSON numbers are IEEE doubles written with Python's shortest round-trip `repr`, so JavaScript reads back
exactly the float64 values the Python sampler uses.

[`export_onnx`] (`ddpm export`) writes the file into every export; the command below adds it to an older one.

```
OUT/diffusion_coefficients.json     # python -m ddpm_plugin.export.coefficients OUT
{
  "format_version": 1,
  "scheduler": {"num_train_timesteps": 1000, "timestep_spacing": "leading", "variance_type": "fixed_large", ...},
  "betas": [...], "alphas_cumprod": [...], ...       # one float64 per t = 0..T-1
}
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ddpm_plugin.model_folder import check_schedule_size
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.trust import read_json, regular_file, write_atomically
from ddpm_plugin.vocabulary import SCHEDULER_CONFIG

from .onnx_folder import resolve_export_folder

COEFFICIENTS_FILE = "diffusion_coefficients.json"
COEFFICIENTS_FORMAT_VERSION = 1
# The arrays a sampler needs: Eq. 15 (x_0 from eps), Eq. 7 (the posterior mean and variance), the respaced
# schedule (from alpha_bar_t) and sigma_t^2 = beta_t for `fixed_large`.
ARRAYS = (
    "betas",
    "alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# The scheduler settings the loop reads, with diffusers' defaults (as `OnnxDDPMPipeline` applies them).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "variance_type": "fixed_small",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
}


def diffusion_coefficients(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document for `scheduler_config`: the loop's scheduler settings and the float64 arrays of
    [`GaussianDiffusion.from_config`], one value per t = 0..T-1."""
    diffusion = GaussianDiffusion.from_config(scheduler_config)
    settings = {name: scheduler_config.get(name, default) for name, default in SCHEDULER_DEFAULTS.items()}
    settings["num_train_timesteps"] = diffusion.num_timesteps  # `trained_betas`, when given, decide T
    arrays = {name: [float(value) for value in getattr(diffusion, name)] for name in ARRAYS}
    return {"format_version": COEFFICIENTS_FORMAT_VERSION, "scheduler": settings, **arrays}


def write_coefficients(export_dir: str | os.PathLike) -> Path:
    r"""
    Write `diffusion_coefficients.json` into an ONNX export folder, from the folder's own scheduler configuration.

    Args:
        export_dir (`str` or `os.PathLike`):
            The folder `ddpm export` wrote (or a pipeline folder holding it in `onnx/`).

    Returns:
        `Path`: the written file.

    Raises:
        `FileNotFoundError`: the folder holds no export or no `scheduler/scheduler_config.json`.
    """
    folder = resolve_export_folder(export_dir)
    try:
        config_path = regular_file(folder, SCHEDULER_CONFIG, what="the scheduler configuration")
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder / SCHEDULER_CONFIG} is missing; re-export the folder with `ddpm export`.") from None
    config = read_json(config_path)
    check_schedule_size(config, str(config_path))
    path = folder / COEFFICIENTS_FILE
    write_atomically(path, json.dumps(diffusion_coefficients(config), separators=(",", ":")) + "\n")
    return path


if __name__ == "__main__":  # python -m ddpm_plugin.export.coefficients EXPORT_DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m ddpm_plugin.export.coefficients EXPORT_DIR")
    try:
        print(write_coefficients(sys.argv[1]))
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
