"""The float64 diffusion coefficients of Ho et al. (2020), computed once from a scheduler configuration.

Training, the variational bound and the NumPy (ONNX Runtime) sampler all read their coefficients from
`GaussianDiffusion`. Everything is float64 because 1 - alpha_bar_t is tiny near t=0: the official code
computes in float64 for the same reason, and stock diffusers keeps float32 (and, under bf16 training,
rounds sqrt(1 - alpha_bar_t) so coarsely that no noise is added at t < 10).

`SCHEDULER_OPTIONS` is the one allow-list of `DDPMScheduler` settings: `paper_scheduler` and
`GaussianDiffusion.from_config` refuse whatever training, the bound and the NumPy sampler do not model.

This module imports only NumPy and the standard library, so the torch-free ONNX sampler can use it. It is
also copied next to the pipeline file when a pipeline is saved, so `trust_remote_code` loading finds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

import numpy as np

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
# sigma_t^2 of the reverse process: beta_tilde_t ("fixed_small", and "fixed_small_log", which diffusers computes
# as exp(0.5 log beta_tilde_t)) or beta_t ("fixed_large"). diffusers' "fixed_large_log" takes the square root of
# log(beta_t) and samples NaN; "learned" and "learned_range" need a network trained to predict its variance.
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large"]
TimestepSpacing = Literal["leading", "linspace", "trailing"]

# Every argument of diffusers' `DDPMScheduler`, with the values that training, the bound and the NumPy (ONNX
# Runtime) sampler model, or `None` where `check_scheduler_config` checks the value itself. Any other value
# would be followed by diffusers' scheduler alone, so PyTorch sampling would silently disagree with the rest.
SCHEDULER_OPTIONS: dict[str, tuple[Any, ...] | None] = {
    "num_train_timesteps": None,  # T, a positive integer
    "beta_start": None,  # 0 < beta_start <= beta_end < 1 (unless `trained_betas` are given)
    "beta_end": None,
    "beta_schedule": get_args(BetaSchedule),
    "trained_betas": None,  # beta_1..beta_T given outright, each in (0, 1)
    "variance_type": get_args(VarianceType),
    "clip_sample": (True, False),  # clip the predicted x_0 to [-clip_sample_range, clip_sample_range]
    "clip_sample_range": None,  # positive
    "prediction_type": ("epsilon",),  # training fits eps; the bound and the NumPy sampler read eps
    "thresholding": (False,),  # dynamic thresholding exists only in diffusers' step
    "dynamic_thresholding_ratio": None,  # read only with thresholding
    "sample_max_value": None,  # read only with thresholding
    "timestep_spacing": get_args(TimestepSpacing),  # which t a shorter sampling schedule visits
    "steps_offset": None,  # a non-negative integer added to "leading" timesteps
    "rescale_betas_zero_snr": (False,),  # would change the betas diffusers' scheduler alone uses
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_scheduler_config(config: Mapping[str, Any]) -> None:
    """Refuse a scheduler configuration that training, the bound and the NumPy sampler would not follow as
    diffusers' `DDPMScheduler` does (see `SCHEDULER_OPTIONS`). Keys of other schedulers (such as
    `DDIMScheduler`'s `set_alpha_to_one`) are left to them."""
    for name, allowed in SCHEDULER_OPTIONS.items():
        if allowed is not None and name in config and config[name] not in allowed:
            raise ValueError(
                f"`{name}` must be one of {list(allowed)}, got {config[name]!r}: training, the bound and ONNX "
                f"sampling model no other value."
            )
    steps = config.get("num_train_timesteps", 1000)
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"`num_train_timesteps` must be a positive integer, got {steps!r}.")
    if config.get("trained_betas") is None:
        beta_start, beta_end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < `beta_start` <= `beta_end` < 1, got {beta_start!r} and {beta_end!r}.")
    if not config.get("clip_sample_range", 1.0) > 0:
        raise ValueError(f"`clip_sample_range` must be positive, got {config['clip_sample_range']!r}.")
    offset = config.get("steps_offset", 0)
    if not _is_int(offset) or offset < 0:
        raise ValueError(f"`steps_offset` must be a non-negative integer, got {offset!r}.")


def get_beta_schedule(
    beta_schedule: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int
) -> np.ndarray:
    """The forward-process variances beta_1..beta_T in float64 (paper Sec. 4: linear 1e-4..0.02, T=1000)."""
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_diffusion_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal (2021), as diffusers' `betas_for_alpha_bar` with the cosine transform.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), 0.999)
             for i in range(num_diffusion_timesteps)],
            dtype=np.float64,
        )
    raise ValueError(f"`beta_schedule` must be one of {list(get_args(BetaSchedule))}, got {beta_schedule!r}.")


@dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """Every schedule array of the paper, indexed by t = 0..T-1 (paper step t+1), in float64.

    Names follow the official implementation: `alphas_cumprod` is alpha_bar_t, `posterior_variance` is
    beta_tilde_t (Eq. 7), `posterior_mean_coef1/2` are the weights of x_0 and x_t in mu_tilde_t (Eq. 7).
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "GaussianDiffusion":
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
        if not ((betas > 0).all() and (betas < 1).all()):
            raise ValueError("every beta_t must lie in (0, 1); check `beta_start`, `beta_end` or `trained_betas`.")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta_tilde is 0 at t=0; its log is clipped to the value at t=1, as the official code does.
        floor = posterior_variance[1] if betas.size > 1 else betas[0]
        posterior_log_variance_clipped = np.log(np.append(floor, posterior_variance[1:]))
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GaussianDiffusion":
        """Build from a `DDPMScheduler` configuration, or that of a scheduler built from one (such as
        `DDIMScheduler.from_config(...)`), once `check_scheduler_config` has accepted it."""
        check_scheduler_config(config)
        trained_betas = config.get("trained_betas")
        if trained_betas is not None:
            return cls.from_betas(np.asarray(trained_betas, dtype=np.float64))
        return cls.from_betas(
            get_beta_schedule(
                config.get("beta_schedule", "linear"),
                beta_start=config.get("beta_start", 1e-4),
                beta_end=config.get("beta_end", 0.02),
                num_diffusion_timesteps=config.get("num_train_timesteps", 1000),
            )
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def model_log_variance(self, variance_type: str) -> np.ndarray:
        """log sigma_t^2 of the reverse process p(x_{t-1} | x_t) for each t (paper Sec. 3.2).

        `fixed_large` is sigma_t^2 = beta_t, with the t=0 entry set to beta_tilde_1 so the decoder keeps a
        sensible variance (as the official code); `fixed_small` is sigma_t^2 = beta_tilde_t.
        """
        if variance_type == "fixed_large":
            return np.log(np.append(self.posterior_variance[1], self.betas[1:]))
        if variance_type in ("fixed_small", "fixed_small_log"):
            return self.posterior_log_variance_clipped
        raise ValueError(
            f"`variance_type` must be one of {list(get_args(VarianceType))}, got {variance_type!r}."
        )

    # --- The paper's quantities, in NumPy, for the torch-free sampler and for reference checks. ---

    def q_sample(self, x_start: np.ndarray, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        assert x_start.shape == noise.shape and t.shape == x_start.shape[:1]
        return _bcast(self.sqrt_alphas_cumprod[t], x_start) * x_start + _bcast(
            self.sqrt_one_minus_alphas_cumprod[t], x_start
        ) * noise

    def predict_start_from_noise(self, x_t: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """Eq. 4 solved for x_0: x_0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps."""
        assert x_t.shape == eps.shape and t.shape == x_t.shape[:1]
        return _bcast(self.sqrt_recip_alphas_cumprod[t], x_t) * x_t - _bcast(
            self.sqrt_recipm1_alphas_cumprod[t], x_t
        ) * eps

    def q_posterior_mean_variance(
        self, x_start: np.ndarray, x_t: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eq. 6-7: mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape and t.shape == x_t.shape[:1]
        mean = _bcast(self.posterior_mean_coef1[t], x_t) * x_start + _bcast(self.posterior_mean_coef2[t], x_t) * x_t
        return mean, _bcast(self.posterior_variance[t], x_t), _bcast(self.posterior_log_variance_clipped[t], x_t)


def _bcast(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Reshape a per-example coefficient [B] to broadcast against x [B, ...]."""
    return coef.reshape((-1,) + (1,) * (x.ndim - 1))
