import numpy as np
import pytest
import torch

from ddpm_plugin import GaussianDiffusion, paper_scheduler


def test_paper_scheduler_matches_the_paper():
    config = paper_scheduler("cifar10").config
    assert config.num_train_timesteps == 1000
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (1e-4, 0.02, "linear")
    assert config.prediction_type == "epsilon" and config.clip_sample
    assert config.variance_type == "fixed_large"
    assert paper_scheduler("celebahq").config.variance_type == "fixed_small"
    assert paper_scheduler("lsun").config.variance_type == "fixed_small"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"variance_type": "fixed_medium"}, "`variance_type` must be one of"),
        ({"num_train_timesteps": 0}, "`num_train_timesteps` must be a positive"),
        ({"num_train_timesteps": -5}, "`num_train_timesteps` must be a positive"),
        ({"beta_schedule": "quadratic"}, "`beta_schedule` must be one of"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "need 0 < `beta_start`"),
        ({"prediction_type": "noise"}, "`prediction_type` must be one of"),
        ({"num_steps": 10}, "unknown `DDPMScheduler` arguments: \\['num_steps'\\]"),
    ],
)
def test_paper_scheduler_rejects_invalid_overrides(overrides, message):
    with pytest.raises(ValueError, match=message):
        paper_scheduler("cifar10", **overrides)


def test_paper_scheduler_accepts_valid_overrides():
    scheduler = paper_scheduler("digits", variance_type="fixed_small", num_train_timesteps=500, clip_sample=False)
    assert scheduler.config.variance_type == "fixed_small" and scheduler.config.num_train_timesteps == 500
    assert not scheduler.config.clip_sample


def test_paper_scheduler_rejects_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        paper_scheduler("imagenet")


def test_coefficients_are_float64_and_match_closed_form():
    diffusion = GaussianDiffusion.from_config(paper_scheduler().config)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    assert diffusion.betas.dtype == np.float64 and np.array_equal(diffusion.betas, betas)
    alphas_cumprod = np.cumprod(1 - betas)
    np.testing.assert_allclose(diffusion.alphas_cumprod, alphas_cumprod, rtol=1e-14)
    t = 500
    beta_tilde = (1 - alphas_cumprod[t - 1]) / (1 - alphas_cumprod[t]) * betas[t]
    assert diffusion.posterior_variance[t] == pytest.approx(beta_tilde, rel=1e-12)
    assert diffusion.posterior_variance[0] == 0.0
    assert diffusion.posterior_log_variance_clipped[0] == np.log(diffusion.posterior_variance[1])
    # fixed_large: sigma^2 = beta_t, with beta_tilde_1 at t=0; fixed_small: beta_tilde_t.
    np.testing.assert_allclose(np.exp(diffusion.model_log_variance("fixed_large"))[1:], betas[1:], rtol=1e-12)
    assert np.exp(diffusion.model_log_variance("fixed_large"))[0] == pytest.approx(diffusion.posterior_variance[1])
    with pytest.raises(ValueError, match="variance_type"):
        diffusion.model_log_variance("learned")


def test_coefficients_agree_with_diffusers_float32():
    scheduler = paper_scheduler()
    diffusion = GaussianDiffusion.from_config(scheduler.config)
    np.testing.assert_allclose(diffusion.alphas_cumprod, scheduler.alphas_cumprod.numpy(), rtol=1e-5)


def test_q_sample_matches_closed_form():
    diffusion = GaussianDiffusion.from_config(paper_scheduler().config)
    rng = np.random.default_rng(0)
    x0, eps, t = rng.standard_normal((3, 1, 4, 4)), rng.standard_normal((3, 1, 4, 4)), np.array([0, 10, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    np.testing.assert_allclose(x_t, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps, rtol=1e-12)
    # Eq. 4 inverted recovers x0 from x_t and eps.
    np.testing.assert_allclose(diffusion.predict_start_from_noise(x_t, t, eps), x0, atol=1e-9)


def test_posterior_mean_is_the_paper_formula():
    diffusion = GaussianDiffusion.from_config(paper_scheduler().config)
    x0, x_t, t = np.ones((1, 1, 2, 2)), np.full((1, 1, 2, 2), 0.5), np.array([100])
    mean, variance, _ = diffusion.q_posterior_mean_variance(x0, x_t, t)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    expected = np.sqrt(abar[99]) * betas[100] / (1 - abar[100]) * 1.0 + np.sqrt(1 - betas[100]) * (1 - abar[99]) / (
        1 - abar[100]
    ) * 0.5
    np.testing.assert_allclose(mean, expected, rtol=1e-12)


def test_torch_q_sample_adds_noise_at_small_t_under_bf16_autocast():
    from ddpm_plugin.pipelines.diffusion_ops import q_sample

    diffusion = GaussianDiffusion.from_config(paper_scheduler().config)
    x0, noise, t = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.tensor([0, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_t = q_sample(diffusion, x0, t, noise)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t[:, 0, 0, 0], torch.tensor([0.01, 0.0299744]), rtol=1e-5, atol=0)
