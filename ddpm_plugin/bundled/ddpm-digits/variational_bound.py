"""The variational bound of Ho et al. (2020), Eq. 5, in bits per dimension, as the official evaluation computes it.

    L = L_T + sum_{t>1} L_{t-1} + L_0
      = KL(q(x_T|x_0) || N(0, I)) + sum_t KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)) - log p_theta(x_0|x_1)

Every term is averaged over the dimensions of an image and divided by ln 2 where it is computed. The model's
x_0 prediction is clipped as the sampler clips it (to [-1, 1] in the paper), the decoder L_0 is a Gaussian
discretized into the 256 bins of 8-bit data (Sec. 3.3), and the schedule coefficients are the float64 arrays of
`GaussianDiffusion`. The math runs in float64 after the network, whatever precision the network runs in.
`calc_bpd_loop` evaluates every term of a set of images, batching (image, t) pairs through the network.

Index convention (as `GaussianDiffusion`): t = 0..T-1 is paper step t+1, so t = 0 is the decoder term L_0.
This file imports only NumPy, torch and its siblings: it is copied beside a saved pipeline.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, get_args

import numpy as np
import torch

from .diffusion_ops import extract, predict_start_from_noise, q_posterior_mean, q_sample
from .gaussian_diffusion import GaussianDiffusion, VarianceType

# Half the width of one of the 256 bins of 8-bit data mapped to [-1, 1].
BIN_HALF_WIDTH = 1.0 / 255.0
# Floor inside the logarithms of the decoder, as the official code.
LOG_FLOOR = 1e-12


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (arguments broadcast)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation the official code uses (so the reference values match it)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) in nats, elementwise, of 8-bit data x in [-1, 1] under N(means, exp(log_scales)^2) integrated
    over each pixel's bin of width 2/255 (paper Eq. 13); the edge bins extend to -inf below -1 and +inf above 1.
    """
    assert x.shape == means.shape, f"x {tuple(x.shape)} and means {tuple(means.shape)} differ"
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_FLOOR))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=LOG_FLOOR))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )
    assert log_probs.shape == x.shape
    return log_probs


def check_variance_type(variance_type: str | None) -> str:
    if variance_type not in get_args(VarianceType):
        raise ValueError(
            f"the bound needs a fixed reverse-process variance: scheduler `variance_type` must be one of "
            f"{list(get_args(VarianceType))}, got {variance_type!r}."
        )
    return variance_type


def clip_range_of(config: Mapping[str, Any]) -> float | None:
    """The range a scheduler configuration clips the predicted x_0 to, as `DDPMScheduler.step` clips it, or `None`
    when it does not clip: the bound's p_theta(x_{t-1} | x_t) is the sampler's."""
    return config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None


def prior_bpd(diffusion: GaussianDiffusion, x_start: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per image [B]. Tiny (about 1e-5) for the paper's schedule."""
    t = torch.full((x_start.shape[0],), diffusion.num_timesteps - 1, dtype=torch.long, device=x_start.device)
    mean = extract(diffusion.sqrt_alphas_cumprod, t, x_start.shape, torch.float64) * x_start
    log_variance = extract(diffusion.log_one_minus_alphas_cumprod, t, x_start.shape, torch.float64)
    zeros = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_variance, zeros, zeros)) / math.log(2.0)


def p_mean_log_variance(
    diffusion: GaussianDiffusion,
    variance_type: str,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_range: float | None = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and log variance of p_theta(x_{t-1} | x_t) and the x_0 prediction, from eps_theta: x_0 from Eq. 4
    solved for it (Eq. 15), clipped to [-clip_range, clip_range] as the sampler clips it (`None`: not clipped),
    then the posterior mean mu~_t(x_t, x_0) of Eq. 7."""
    x_t, eps = x_t.to(torch.float64), model_output.to(torch.float64)
    pred_x_start = predict_start_from_noise(diffusion, x_t, t, eps)
    if clip_range is not None:
        pred_x_start = pred_x_start.clamp(-clip_range, clip_range)
    model_mean = q_posterior_mean(diffusion, pred_x_start, x_t, t)
    model_log_variance = extract(diffusion.model_log_variance(variance_type), t, x_t.shape, torch.float64)
    return model_mean, model_log_variance, pred_x_start


def vb_terms_bpd(
    diffusion: GaussianDiffusion,
    variance_type: str,
    *,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_range: float | None = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound's term at each example's t, in bits/dim [B], and the x_0 prediction [B, C, H, W].

    For t > 0: L_{t} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (Eq. 5); for t = 0 the decoder
    L_0 = -log p_theta(x_0 | x_1), a discretized Gaussian with the model's t=0 variance.
    """
    assert x_start.shape == x_t.shape == model_output.shape and t.shape == x_start.shape[:1]
    x_start, x_t = x_start.to(torch.float64), x_t.to(torch.float64)
    shape = x_t.shape
    true_mean = q_posterior_mean(diffusion, x_start, x_t, t)
    true_log_variance = extract(diffusion.posterior_log_variance_clipped, t, shape, torch.float64)
    model_mean, model_log_variance, pred_x_start = p_mean_log_variance(
        diffusion, variance_type, model_output, x_t, t, clip_range
    )
    kl_bpd = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    decoder_nll_bpd = -mean_flat(
        discretized_gaussian_log_likelihood(x_start, means=model_mean, log_scales=0.5 * model_log_variance)
    ) / math.log(2.0)
    return torch.where(t == 0, decoder_nll_bpd, kl_bpd), pred_x_start


class BoundTerms(NamedTuple):
    """What [`calc_bpd_loop`] returns, per image (float64 NumPy arrays)."""

    terms_bpd: np.ndarray  # [N, T]: column t > 0 is L_t, column 0 the decoder L_0
    prior_bpd: np.ndarray  # [N]: L_T
    x_start_mse: np.ndarray  # [N, T]: squared error of the x_0 prediction on [-1, 1], per dimension


def calc_bpd_loop(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    variance_type: str,
    x_start: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator | None,
    progress_bar: Callable[..., Any],
    clip_range: float | None = 1.0,
) -> BoundTerms:
    """Every term of the bound for images x_0 [N, C, H, W] on [-1, 1], each from one x_t ~ q(x_t | x_0).

    As the official `calc_bpd_loop`, with the (image, t) pairs batched: every call of `model(x_t, t)` (eps_theta,
    in any precision) evaluates up to `batch_size` pairs, so N >= `batch_size` images cost one pass per t and
    fewer images share a pass across several t. `progress_bar(total=passes)` is a tqdm-like context manager.
    """
    device, num_images, num_timesteps = x_start.device, x_start.shape[0], diffusion.num_timesteps
    terms_bpd = np.zeros((num_images, num_timesteps))
    x_start_mse = np.zeros((num_images, num_timesteps))
    prior = np.zeros(num_images)
    images_per_pass = min(num_images, batch_size)
    timesteps_per_pass = max(1, batch_size // images_per_pass)
    num_passes = -(-num_images // images_per_pass) * -(-num_timesteps // timesteps_per_pass)

    with progress_bar(total=num_passes) as bar:
        for start in range(0, num_images, images_per_pass):
            x_start_n = x_start[start : start + images_per_pass]
            stop = start + x_start_n.shape[0]
            prior[start:stop] = prior_bpd(diffusion, x_start_n.double()).cpu().numpy()
            for t_stop in range(num_timesteps, 0, -timesteps_per_pass):
                # 1. (image, t) pairs of this pass, t-major: [k * n] with k timesteps and n images.
                timesteps = torch.arange(max(t_stop - timesteps_per_pass, 0), t_stop, device=device)
                t = timesteps.repeat_interleave(x_start_n.shape[0])
                x_start_kn = x_start_n.repeat(timesteps.shape[0], 1, 1, 1)
                # 2. x_t ~ q(x_t | x_0) (Eq. 4), with float32 noise drawn on the generator's device.
                noise_device = generator.device if generator is not None else device
                noise = torch.randn(x_start_kn.shape, generator=generator, device=noise_device, dtype=torch.float32)
                x_t = q_sample(diffusion, x_start_kn, t, noise.to(device))
                # 3. L_t (KL to the posterior, or the decoder at t = 0) and the x_0 error, in float64.
                term_bpd, pred_x_start = vb_terms_bpd(
                    diffusion, variance_type, model_output=model(x_t, t), x_start=x_start_kn, x_t=x_t, t=t,
                    clip_range=clip_range,
                )
                mse = mean_flat((pred_x_start - x_start_kn.double()) ** 2)
                columns = timesteps.cpu().numpy()
                terms_bpd[start:stop, columns] = term_bpd.reshape(len(columns), -1).T.cpu().numpy()
                x_start_mse[start:stop, columns] = mse.reshape(len(columns), -1).T.cpu().numpy()
                bar.update()
    return BoundTerms(terms_bpd=terms_bpd, prior_bpd=prior, x_start_mse=x_start_mse)


def cumulative_rate_bpd(terms_bpd: np.ndarray, prior_bpd: np.ndarray) -> np.ndarray:
    """Rate received from T down to each t (paper Fig. 5): L_T + sum_{s >= max(t, 1)} L_s, per image [N, T].

    The decoder term L_0 is distortion, not rate, so the curve ends at L_T + L_{T-1} + ... + L_1.
    """
    kl_terms = np.concatenate([np.zeros_like(terms_bpd[:, :1]), terms_bpd[:, 1:]], axis=1)
    return prior_bpd[:, None] + np.cumsum(kl_terms[:, ::-1], axis=1)[:, ::-1]


def distortion_rmse(x_start_mse: np.ndarray) -> np.ndarray:
    """RMSE of the x_0 prediction against x_0 on the 0..255 scale, per t [T], from per-image MSEs on [-1, 1]."""
    return np.sqrt(x_start_mse.mean(axis=0)) * 127.5
