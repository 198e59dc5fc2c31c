"""The NumPy step math of the ONNX Runtime sampler: DDPM (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021)
and DPM-Solver++ (Lu et al. 2022, second-order multistep) on the float64 coefficients of [`GaussianDiffusion`],
with the timesteps and respaced schedule diffusers' schedulers choose. `demo/web/sampler.js` is the same math in
JavaScript, function for function (`inferenceTimesteps`, `respacedSchedule`, `ddimSigma`, `ddpmStepFunction`,
`ddimStepFunction`, `dpmSolverTimesteps`, `dpmSolverStepFunction`): change both together.

A step function computes its per-step coefficients once, when it is made, and works in float64 buffers it
allocates once per sample shape, so a step costs a few NumPy calls and no allocation: the sampling loop's time
goes to the network. It returns views of those buffers, valid until its next call.

NumPy only (no onnxruntime, no torch).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion

# step(i, x_t, eps, generator) -> (x_{t-1}, predicted x_0), both float64 and valid until the next call
StepFunction = Callable[[int, np.ndarray, np.ndarray, Any], tuple[np.ndarray, np.ndarray]]

class UNetBuffers:
    """The host arrays a network engine reads x_t and t from and writes eps into, in place: float32 `sample`
    (NCHW), int64 `timestep` and float32 `noise_pred`. The sampling loop writes into `sample`, never replaces it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._sample = np.zeros(shape, dtype=np.float32)
        self._timestep = np.zeros(shape[:1], dtype=np.int64)
        self._noise_pred = np.zeros(shape, dtype=np.float32)

    @property
    def sample(self) -> np.ndarray:
        """x_t: write into it (`np.copyto`), never replace it."""
        return self._sample

    @property
    def timestep(self) -> np.ndarray:
        return self._timestep

    @property
    def noise_pred(self) -> np.ndarray:
        return self._noise_pred


# --- Timesteps and the respaced schedule, as diffusers' schedulers compute them. ---


def inference_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """The descending timesteps `DDPMScheduler.set_timesteps` / `DDIMScheduler.set_timesteps` choose for
    `num_inference_steps` under the config's `timestep_spacing` and `steps_offset`."""
    num_train_timesteps = config.get("num_train_timesteps", 1000)
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
        return timesteps + config.get("steps_offset", 0)
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_inference_steps
        return np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    raise ValueError(f"`timestep_spacing` must be 'linspace', 'leading' or 'trailing', got {spacing!r}.")


def respace(diffusion: GaussianDiffusion, timesteps: np.ndarray) -> GaussianDiffusion:
    """The diffusion process restricted to `timesteps` (descending): its step k goes from t_k to the next
    kept timestep, with beta'_k = 1 - alpha_bar_{t_k} / alpha_bar_{t_{k-1}} (Nichol & Dhariwal 2021, App. B).

    Its posterior coefficients are exactly the ones `DDPMScheduler.step` forms from `alphas_cumprod[t]` and
    `alphas_cumprod[prev_t]` when `num_inference_steps` < T. Index k of the result is the k-th smallest kept
    timestep. With every timestep kept, `diffusion` itself is returned.
    """
    ascending = np.asarray(timesteps, dtype=np.int64)[::-1]
    if np.array_equal(ascending, np.arange(diffusion.num_timesteps)):
        return diffusion
    alphas_cumprod = diffusion.alphas_cumprod[ascending]
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion.from_betas(1.0 - alphas_cumprod / alphas_cumprod_prev)


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma_t(eta) of Song et al. (2021), Eq. 16: eta sqrt((1 - a_prev)/(1 - a_t) (1 - a_t / a_prev))."""
    return eta * float(np.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)))


# --- One denoising step: per-step coefficients computed once, work buffers allocated once per shape. ---


class StepBuffers:
    """float64 work arrays of one shape, allocated on first use and reused by every later step of that shape.
    A step returns views of them: its results are valid until the step function is called again."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.shape: tuple[int, ...] | None = None
        self.arrays: list[np.ndarray] = []

    def of(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        if shape != self.shape:
            self.arrays = [np.empty(shape, dtype=np.float64) for _ in range(self.count)]
            self.shape = shape
        return self.arrays


def clip_bound(config: Mapping[str, Any]) -> float | None:
    """The r of [-r, r] the predicted x_0 is clipped to, or None when the configuration's `clip_sample` is off."""
    return config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None


def check_epsilon_prediction(config: Mapping[str, Any]) -> None:
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"only eps-prediction models are supported, the scheduler says {config.get('prediction_type')!r}."
        )


def predict_start(x_t: np.ndarray, noise_pred: np.ndarray, coef_x: np.float64, coef_eps: np.float64,
                  bound: float | None, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Eq. 15 into `out` (float64): x_0 = coef_x x_t - coef_eps eps, clipped to [-bound, bound] unless None."""
    np.multiply(x_t, coef_x, out=out, dtype=np.float64)
    np.multiply(noise_pred, coef_eps, out=scratch, dtype=np.float64)
    np.subtract(out, scratch, out=out)
    if bound is not None:
        np.clip(out, -bound, bound, out=out)
    return out


def ddpm_step_function(
    diffusion: GaussianDiffusion, config: Mapping[str, Any], timesteps: np.ndarray, variance_type: str
) -> StepFunction:
    """Ancestral step (Algorithm 2, line 4) on the (respaced) schedule, as `DDPMScheduler.step`."""
    check_epsilon_prediction(config)
    diffusion = respace(diffusion, timesteps)
    # sigma_t^2 as diffusers applies it: beta_t (fixed_large) or beta_tilde_t floored at 1e-20 (fixed_small).
    if variance_type.startswith("fixed_large"):
        sigmas = np.sqrt(diffusion.betas)
    else:
        sigmas = np.sqrt(np.maximum(diffusion.posterior_variance, 1e-20))
    k = np.arange(len(timesteps))[::-1]  # step i uses index k = n - 1 - i of the respaced schedule
    coef_x, coef_eps = diffusion.sqrt_recip_alphas_cumprod[k], diffusion.sqrt_recipm1_alphas_cumprod[k]
    coef_x0, coef_xt = diffusion.posterior_mean_coef1[k], diffusion.posterior_mean_coef2[k]
    sigmas, noisy = sigmas[k], np.asarray(timesteps) > 0
    bound, buffers = clip_bound(config), StepBuffers(3)

    def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
        pred_original_sample, mean, scratch = buffers.of(x_t.shape)
        # Eq. 15: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped to [-1, 1].
        predict_start(x_t, noise_pred, coef_x[i], coef_eps[i], bound, pred_original_sample, scratch)
        # Eq. 7: mu_tilde_t(x_t, x_0); then + sigma_t z for t > 0.
        np.multiply(pred_original_sample, coef_x0[i], out=mean)
        np.multiply(x_t, coef_xt[i], out=scratch, dtype=np.float64)
        np.add(mean, scratch, out=mean)
        if noisy[i]:
            z = generator.standard_normal(x_t.shape, dtype=np.float32)
            np.add(mean, np.multiply(z, sigmas[i], out=scratch, dtype=np.float64), out=mean)
        return mean, pred_original_sample

    return step


def ddim_step_function(
    diffusion: GaussianDiffusion, config: Mapping[str, Any], timesteps: np.ndarray, eta: float,
    num_inference_steps: int,
) -> StepFunction:
    """DDIM step (Song et al. 2021, Eq. 12) as `DDIMScheduler.step` with `use_clipped_model_output=False`."""
    check_epsilon_prediction(config)
    step_ratio = diffusion.num_timesteps // num_inference_steps
    final_alpha_cumprod = 1.0 if config.get("set_alpha_to_one", True) else diffusion.alphas_cumprod[0]
    t = np.asarray(timesteps, dtype=np.int64)
    alpha_bar_prev = np.array([diffusion.alphas_cumprod[p] if p >= 0 else final_alpha_cumprod for p in t - step_ratio])
    sigmas = np.array([ddim_sigma(a, p, eta) for a, p in zip(diffusion.alphas_cumprod[t], alpha_bar_prev)])
    coef_x, coef_eps = diffusion.sqrt_recip_alphas_cumprod[t], diffusion.sqrt_recipm1_alphas_cumprod[t]
    # x_{t-1} = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
    coef_x0, coef_direction = np.sqrt(alpha_bar_prev), np.sqrt(1.0 - alpha_bar_prev - sigmas**2)
    sigmas32 = sigmas.astype(np.float32)
    bound, buffers = clip_bound(config), StepBuffers(3)

    def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
        pred_original_sample, x_prev, scratch = buffers.of(x_t.shape)
        predict_start(x_t, noise_pred, coef_x[i], coef_eps[i], bound, pred_original_sample, scratch)
        np.multiply(pred_original_sample, coef_x0[i], out=x_prev)
        np.multiply(noise_pred, coef_direction[i], out=scratch, dtype=np.float64)
        np.add(x_prev, scratch, out=x_prev)
        if eta > 0:  # sigma z in float32, as sampler.js mirrors it
            np.add(x_prev, generator.standard_normal(x_t.shape, dtype=np.float32) * sigmas32[i], out=x_prev)
        return x_prev, pred_original_sample

    return step


# --- DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
# Models", Algorithm 2: multistep, second order, in data prediction). ---


def dpm_solver_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """The descending timesteps `DPMSolverMultistepScheduler.set_timesteps` chooses under the configuration's
    `timestep_spacing`: for "linspace" and "leading", the `num_inference_steps` + 1 timesteps of
    [`inference_timesteps`] without the last, since the final step goes to sigma = 0; for "trailing", those of
    `num_inference_steps`. A step count whose timesteps would repeat or pass T - 1 is refused."""
    num_train_timesteps = config.get("num_train_timesteps", 1000)
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "trailing":
        timesteps = inference_timesteps(config, num_inference_steps)
    else:
        timesteps = inference_timesteps(config, num_inference_steps + 1)[:-1]
    timesteps = timesteps.astype(np.int64)
    if len(np.unique(timesteps)) != len(timesteps) or timesteps.max() >= num_train_timesteps:
        problem = "visit a timestep twice" if len(np.unique(timesteps)) != len(timesteps) else (
            f"visit t={timesteps.max()} (steps_offset {config.get('steps_offset', 0)}), past the last timestep")
        raise ValueError(
            f"`num_inference_steps` {num_inference_steps} is too many for dpmsolver++ with timestep_spacing "
            f"{spacing!r} over {num_train_timesteps} training steps: it would {problem}; use fewer steps."
        )
    return timesteps


def dpm_solver_step_function(diffusion: GaussianDiffusion, config: Mapping[str, Any], timesteps: np.ndarray) -> StepFunction:
    """DPM-Solver++(2M) as `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`: first
    order at the first step (no earlier x_0 yet) and at the last, which goes to sigma = 0 and so returns the
    predicted x_0; second order in between. The predicted x_0 is not clipped (diffusers' solver ignores
    `clip_sample`). Deterministic: `generator` is not read.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and lambda_t = log(alpha_t / sigma_t), a step
    from s to t (h = lambda_t - lambda_s) is
        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,
    with D = x_0(s) at first order and D = (1 + 1/(2r)) x_0(s) - 1/(2r) x_0(s') at second order, where s' is the
    step before s and r = (lambda_s - lambda_s') / h.
    """
    check_epsilon_prediction(config)
    alpha_bar = diffusion.alphas_cumprod[timesteps]
    alphas = np.append(np.sqrt(alpha_bar), 1.0)  # the final "timestep" is the clean end: alpha 1, sigma 0
    sigmas = np.append(np.sqrt(1.0 - alpha_bar), 0.0)
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas)  # lambda = +inf at the clean end
    num_steps = len(timesteps)
    h = lambdas[1:] - lambdas[:-1]  # h[i]: from step i to i + 1 (+inf into the clean end, never used)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = sigmas[1:] / sigmas[:-1]
        coef_data = alphas[1:] * np.expm1(-h)
        r = np.append(np.nan, (lambdas[1:-1] - lambdas[:-2]) / h[1:])  # r[i] for i >= 1
        coef_x0, coef_previous = 1.0 + 0.5 / r, 0.5 / r
    buffers = StepBuffers(4)
    previous_index = [-1]  # the step whose x_0 the second x_0 buffer holds

    def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
        first, second, x_prev, data = buffers.of(x_t.shape)
        # x_0 = (x_s - sigma_s eps) / alpha_s (data prediction), into the buffer the step before did not use.
        pred_original_sample, previous = (first, second) if i % 2 == 0 else (second, first)
        np.multiply(noise_pred, sigmas[i], out=pred_original_sample, dtype=np.float64)
        np.subtract(x_t, pred_original_sample, out=pred_original_sample, dtype=np.float64)
        np.divide(pred_original_sample, alphas[i], out=pred_original_sample)
        if i == num_steps - 1:  # to sigma = 0: x_t = x_0 (first order with exp(-h) = 0)
            np.copyto(x_prev, pred_original_sample)
        else:
            if i > 0 and previous_index[0] == i - 1:  # second order: the difference quotient of x_0 over lambda
                np.multiply(pred_original_sample, coef_x0[i], out=data)
                np.subtract(data, np.multiply(previous, coef_previous[i], out=x_prev), out=data)
            else:
                np.copyto(data, pred_original_sample)
            np.multiply(data, coef_data[i], out=data)
            np.multiply(x_t, ratio[i], out=x_prev, dtype=np.float64)
            np.subtract(x_prev, data, out=x_prev)
        previous_index[0] = i
        return x_prev, pred_original_sample

    return step
