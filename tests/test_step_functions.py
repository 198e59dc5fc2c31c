"""The NumPy step functions with precomputed coefficients and reused buffers give, bit for bit, what the plain
formulas give: each step is checked against the textbook expressions on `GaussianDiffusion` (Eq. 15, Eq. 7,
Song et al. Eq. 12, DPM-Solver++(2M)) over whole trajectories, from the same eps and noise."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_plugin.export.numpy_sampler import (
    ddim_sigma, ddim_step_function, ddpm_step_function, dpm_solver_step_function, dpm_solver_timesteps,
    inference_timesteps, respace,
)
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion

CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
          "clip_sample": True, "timestep_spacing": "leading"}
SHAPE = (3, 1, 4, 4)


def plain_x0(diffusion, x_t, eps, t, clip=True):
    x0 = diffusion.predict_start_from_noise(x_t, np.full(x_t.shape[:1], t), eps)
    return np.clip(x0, -1.0, 1.0) if clip else x0


def plain_ddpm(diffusion, timesteps, variance_type):
    diffusion = respace(diffusion, timesteps)
    variance = diffusion.betas if variance_type == "fixed_large" else np.maximum(diffusion.posterior_variance, 1e-20)

    def step(i, x_t, eps, noise):
        k = len(timesteps) - 1 - i
        x0 = plain_x0(diffusion, x_t, eps, k)
        mean, _, _ = diffusion.q_posterior_mean_variance(x0, x_t, np.full(x_t.shape[:1], k))
        if timesteps[i] > 0:
            mean = mean + np.sqrt(variance[k]) * noise.standard_normal(x_t.shape, dtype=np.float32).astype(np.float64)
        return mean, x0

    return step


def plain_ddim(diffusion, timesteps, eta, num_inference_steps):
    ratio = diffusion.num_timesteps // num_inference_steps

    def step(i, x_t, eps, noise):
        t = int(timesteps[i])
        a_t, a_prev = diffusion.alphas_cumprod[t], (diffusion.alphas_cumprod[t - ratio] if t >= ratio else 1.0)
        sigma = ddim_sigma(a_t, a_prev, eta)
        x0 = plain_x0(diffusion, x_t, eps, t)
        x_prev = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev - sigma**2) * eps.astype(np.float64)
        if eta > 0:
            x_prev = x_prev + noise.standard_normal(x_t.shape, dtype=np.float32) * np.float32(sigma)
        return x_prev, x0

    return step


def plain_dpm_solver(diffusion, timesteps):
    alpha_bar = diffusion.alphas_cumprod[timesteps]
    alphas, sigmas = np.append(np.sqrt(alpha_bar), 1.0), np.append(np.sqrt(1.0 - alpha_bar), 0.0)
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas)
    history = []

    def step(i, x_t, eps, noise):
        x0 = (x_t - sigmas[i] * eps.astype(np.float64)) / alphas[i]
        if i == len(timesteps) - 1:
            x_prev = x0.copy()
        else:
            h = lambdas[i + 1] - lambdas[i]
            data = x0
            if history:
                r = (lambdas[i] - lambdas[i - 1]) / h
                data = (1.0 + 0.5 / r) * x0 - (0.5 / r) * history[-1]
            x_prev = (sigmas[i + 1] / sigmas[i]) * x_t.astype(np.float64) - alphas[i + 1] * np.expm1(-h) * data
        history.append(x0)
        return x_prev, x0

    return step


def run(step, timesteps, seed):
    """A trajectory from x_T with made-up eps (a fixed function of x_t and i) and a seeded noise stream; every
    x_{t-1} and x_0 of it, copied as the sampler copies them (x_{t-1} cast to float32)."""
    noise, x_t, out = np.random.default_rng(seed), np.random.default_rng(99).standard_normal(SHAPE, dtype=np.float32), []
    for i in range(len(timesteps)):
        eps = (np.tanh(x_t) * (0.5 + 0.01 * i)).astype(np.float32)
        x_prev, x0 = step(i, x_t, eps, noise)
        out.append((x_prev.astype(np.float32), x0.copy()))
        x_t = out[-1][0]
    return out


def assert_trajectories_equal(actual, expected):
    assert len(actual) == len(expected)
    for (x_prev, x0), (plain_x_prev, plain_x0_) in zip(actual, expected):
        np.testing.assert_array_equal(x0, plain_x0_)
        np.testing.assert_array_equal(x_prev, plain_x_prev)


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("num_inference_steps", [1000, 50, 7])
def test_ddpm_steps_equal_the_plain_formulas(variance_type, num_inference_steps):
    diffusion = GaussianDiffusion.from_config(CONFIG)
    timesteps = inference_timesteps(CONFIG, num_inference_steps)
    assert_trajectories_equal(run(ddpm_step_function(diffusion, CONFIG, timesteps, variance_type), timesteps, 1),
                              run(plain_ddpm(diffusion, timesteps, variance_type), timesteps, 1))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_steps_equal_the_plain_formulas(eta):
    diffusion = GaussianDiffusion.from_config(CONFIG)
    timesteps = inference_timesteps(CONFIG, 20)
    assert_trajectories_equal(run(ddim_step_function(diffusion, CONFIG, timesteps, eta, 20), timesteps, 2),
                              run(plain_ddim(diffusion, timesteps, eta, 20), timesteps, 2))


@pytest.mark.parametrize("num_inference_steps", [1, 2, 10, 25])
def test_dpm_solver_steps_equal_the_plain_formulas(num_inference_steps):
    diffusion = GaussianDiffusion.from_config(CONFIG)
    timesteps = dpm_solver_timesteps(CONFIG, num_inference_steps)
    step = dpm_solver_step_function(diffusion, CONFIG, timesteps)
    for _ in range(2):  # a step function is reused from i = 0 by the next batch: no x_0 of the last run leaks in
        assert_trajectories_equal(run(step, timesteps, 3), run(plain_dpm_solver(diffusion, timesteps), timesteps, 3))


def test_a_step_reuses_its_buffers_for_the_same_shape_and_makes_new_ones_for_another():
    diffusion = GaussianDiffusion.from_config(CONFIG)
    timesteps = inference_timesteps(CONFIG, 10)
    step = ddim_step_function(diffusion, CONFIG, timesteps, 0.0, 10)
    x, eps = np.zeros(SHAPE, np.float32), np.ones(SHAPE, np.float32)
    first, second = step(0, x, eps, None)[0], step(1, x, eps, None)[0]
    assert first is second
    other = step(0, np.zeros((1, 1, 4, 4), np.float32), np.ones((1, 1, 4, 4), np.float32), None)[0]
    assert other.shape == (1, 1, 4, 4) and other is not first
