"""The paper's scheduler, the one allow-list of `DDPMScheduler` settings, and the float64 coefficients."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpm_plugin import GaussianDiffusion, paper_scheduler
from ddpm_plugin.pipelines.gaussian_diffusion import SCHEDULER_OPTIONS


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
    scheduler = paper_scheduler("digits", variance_type="fixed_small", num_train_timesteps=500, clip_sample=False,
                                timestep_spacing="trailing", steps_offset=1)
    assert scheduler.config.variance_type == "fixed_small" and scheduler.config.num_train_timesteps == 500
    assert not scheduler.config.clip_sample
    assert (scheduler.config.timestep_spacing, scheduler.config.steps_offset) == ("trailing", 1)


# --- One allow-list for paper_scheduler and GaussianDiffusion.from_config. ---


def test_allow_list_names_every_ddpm_scheduler_argument():
    # A diffusers release that adds a `DDPMScheduler` argument fails here until the argument is modelled or refused.
    assert set(SCHEDULER_OPTIONS) == set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}


# Settings diffusers' scheduler would follow while training, the bound and the NumPy sampler would not.
UNMODELLED = [
    ({"rescale_betas_zero_snr": True}, "`rescale_betas_zero_snr` must be one of \\[False\\], got True"),
    ({"thresholding": True}, "`thresholding` must be one of \\[False\\], got True"),
    ({"prediction_type": "v_prediction"}, "`prediction_type` must be one of \\['epsilon'\\]"),
    ({"prediction_type": "sample"}, "`prediction_type` must be one of"),
    ({"variance_type": "learned_range"}, "`variance_type` must be one of"),
    ({"variance_type": "learned"}, "`variance_type` must be one of"),
    ({"variance_type": "fixed_large_log"}, "`variance_type` must be one of"),
    ({"beta_schedule": "sigmoid"}, "`beta_schedule` must be one of"),
    ({"clip_sample_range": 0.0}, "`clip_sample_range` must be positive"),
    ({"steps_offset": -1}, "`steps_offset` must be a non-negative integer"),
    ({"trained_betas": [0.5, 1.5]}, "every beta_t must lie in \\(0, 1\\)"),
]


@pytest.mark.parametrize("overrides, message", UNMODELLED)
def test_paper_scheduler_refuses_what_only_diffusers_would_follow(overrides, message):
    with pytest.raises(ValueError, match=message):
        paper_scheduler("cifar10", **overrides)


@pytest.mark.parametrize("overrides, message", UNMODELLED)
def test_float64_schedule_refuses_the_same_configurations(overrides, message):
    # As a saved folder or a swapped-in scheduler brings them: training, the bound and ONNX Runtime sampling all
    # build their schedule through `GaussianDiffusion.from_config`.
    config = {**paper_scheduler("cifar10").config, **overrides}
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion.from_config(config)


def test_fixed_large_log_is_refused_because_diffusers_samples_nan():
    scheduler = DDPMScheduler(variance_type="fixed_large_log")
    scheduler.set_timesteps(10)
    x_t = torch.ones(1, 1, 2, 2)
    assert torch.isnan(scheduler.step(torch.zeros_like(x_t), 900, x_t, generator=torch.manual_seed(0)).prev_sample).all()


def test_float64_schedule_accepts_a_swapped_in_ddim_configuration():
    ddim = DDIMScheduler.from_config(paper_scheduler("cifar10").config)
    assert "set_alpha_to_one" in ddim.config  # a DDIM setting the NumPy sampler reads itself
    np.testing.assert_array_equal(GaussianDiffusion.from_config(ddim.config).betas,
                                  GaussianDiffusion.from_config(paper_scheduler("cifar10").config).betas)


def test_bound_refuses_a_pipeline_whose_scheduler_thresholds(tiny_pipeline):
    tiny_pipeline.scheduler = DDPMScheduler.from_config(tiny_pipeline.scheduler.config, thresholding=True)
    with pytest.raises(ValueError, match="`thresholding` must be one of"):
        tiny_pipeline.bits_per_dim(np.zeros((1, 8, 8), dtype=np.uint8))


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
