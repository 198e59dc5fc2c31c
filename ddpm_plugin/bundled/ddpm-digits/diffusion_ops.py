"""The paper's forward-process quantities on torch tensors, read from the float64 `GaussianDiffusion` arrays.

Coefficients are gathered in float64 and cast to the working dtype only here, at the point of use, and
these functions run outside autocast so mixed-precision training still adds the exact noise at small t.
"""

from __future__ import annotations

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels {0..255} to float32 x_0 in [-1, 1]: x / 127.5 - 1 (the data scaling of Sec. 3.3)."""
    return images.float() / 127.5 - 1.0


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


def predict_start_from_noise(diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 4 solved for x_0: x_0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps, in x_t's dtype."""
    assert x_t.shape == eps.shape, f"x_t {tuple(x_t.shape)} and eps {tuple(eps.shape)} differ"
    return (
        extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t.shape, x_t.dtype) * x_t
        - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t.shape, x_t.dtype) * eps
    )


def q_posterior_mean(diffusion: GaussianDiffusion, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 7: the mean mu~_t(x_t, x_0) of q(x_{t-1} | x_t, x_0), in x_t's dtype."""
    assert x_start.shape == x_t.shape, f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ"
    return (
        extract(diffusion.posterior_mean_coef1, t, x_t.shape, x_t.dtype) * x_start
        + extract(diffusion.posterior_mean_coef2, t, x_t.shape, x_t.dtype) * x_t
    )
