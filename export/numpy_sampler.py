"""The NumPy step math of the ONNX Runtime sampler: DDPM (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021)
and DPM-Solver++ (Lu et al. 2022, second-order multistep) on the float64 coefficients of [`GaussianDiffusion`],
with the timesteps and respaced schedule diffusers' schedulers choose. `demo/web/sampler.js` is the same math in
JavaScript, function for function (`inferenceTimesteps`, `respacedSchedule`, `ddimSigma`, `ddpmStepFunction`,
`ddimStepFunction`, `dpmSolverTimesteps`, `dpmSolverStepFunction`): change both together.

NumPy only (no onnxruntime, no torch).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion

# step(i, x_t, eps, generator) -> (x_{t-1}, predicted x_0)
StepFunction = Callable[[int, np.ndarray, np.ndarray, Any], tuple[np.ndarray, np.ndarray]]

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


# --- One denoising step. ---


def clip_prediction(config: Mapping[str, Any], pred_original_sample: np.ndarray) -> np.ndarray:
    """The predicted x_0 clipped in place to [-r, r] when the configuration's `clip_sample` is on."""
    if config.get("clip_sample", True):
        bound = config.get("clip_sample_range", 1.0)
        np.clip(pred_original_sample, -bound, bound, out=pred_original_sample)
    return pred_original_sample


def check_epsilon_prediction(config: Mapping[str, Any]) -> None:
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"only eps-prediction models are supported, the scheduler says {config.get('prediction_type')!r}."
        )


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
    num_steps = len(timesteps)

    def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
        k = np.full(x_t.shape[:1], num_steps - 1 - i)  # index into the respaced schedule
        # Eq. 15: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped to [-1, 1].
        pred_original_sample = clip_prediction(config, diffusion.predict_start_from_noise(x_t, k, noise_pred))
        # Eq. 7: mu_tilde_t(x_t, x_0); then + sigma_t z for t > 0.
        mean, _, _ = diffusion.q_posterior_mean_variance(pred_original_sample, x_t, k)
        if timesteps[i] > 0:
            mean += sigmas[k[0]] * generator.standard_normal(x_t.shape, dtype=np.float32)
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

    def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
        t, prev_t = int(timesteps[i]), int(timesteps[i]) - step_ratio
        alpha_bar_t = diffusion.alphas_cumprod[t]
        alpha_bar_prev = diffusion.alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
        pred_original_sample = clip_prediction(
            config, diffusion.predict_start_from_noise(x_t, np.full(x_t.shape[:1], t), noise_pred)
        )
        sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
        # x_{t-1} = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
        x_prev = np.sqrt(alpha_bar_prev) * pred_original_sample + np.sqrt(1.0 - alpha_bar_prev - sigma**2) * noise_pred
        if eta > 0:
            x_prev += sigma * generator.standard_normal(x_t.shape, dtype=np.float32)
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
    previous: list[np.ndarray] = []  # x_0 predicted at the step before

    def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
        if i == 0:
            previous.clear()
        # x_0 = (x_s - sigma_s eps) / alpha_s (data prediction).
        pred_original_sample = (x_t - sigmas[i] * noise_pred) / alphas[i]
        if i == num_steps - 1:  # to sigma = 0: x_t = x_0 (first order with exp(-h) = 0)
            x_prev = pred_original_sample.copy()
        else:
            h = lambdas[i + 1] - lambdas[i]
            data = pred_original_sample
            if previous:  # second order: the difference quotient of x_0 over lambda
                r = (lambdas[i] - lambdas[i - 1]) / h
                data = (1.0 + 0.5 / r) * pred_original_sample - (0.5 / r) * previous[0]
            x_prev = (sigmas[i + 1] / sigmas[i]) * x_t - alphas[i + 1] * np.expm1(-h) * data
        previous[:] = [pred_original_sample]
        return x_prev, pred_original_sample

    return step
