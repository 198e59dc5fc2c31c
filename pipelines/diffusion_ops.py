"""The paper's forward-process quantities on torch tensors, read from the float64 `GaussianDiffusion` arrays.

Coefficients are gathered in float64 and cast to the working dtype only here, at the point of use, and
these functions run outside autocast so mixed-precision training still adds the exact noise at small t.
"""

from __future__ import annotations

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def extract(coef: np.ndarray, t: torch.Tensor, x_shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """coef[t] as a [B, 1, 1, ...] tensor of `dtype` on t's device, for broadcasting against x [B, ...]."""
    assert t.ndim == 1 and t.shape[0] == x_shape[0], f"t must be [B] with B={x_shape[0]}, got {tuple(t.shape)}"
    values = torch.from_numpy(coef).to(t.device)[t.long()]  # float64 gather
    return values.to(dtype).reshape((-1,) + (1,) * (len(x_shape) - 1))


@torch.autocast("cpu", enabled=False)
@torch.autocast("cuda", enabled=False)
def q_sample(diffusion: GaussianDiffusion, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, in float32 whatever the autocast."""
    assert x_start.shape == noise.shape, f"x_start {tuple(x_start.shape)} and noise {tuple(noise.shape)} differ"
    x_start, noise = x_start.float(), noise.float()
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )
