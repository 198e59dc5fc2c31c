"""The variational bound in bits/dim: reference values, its pieces, and the pipeline's batched evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from evaluation_fixtures import one_thread  # noqa: F401 (autouse fixture)
from ddpm_plugin import DDPMPaperPipeline, GaussianDiffusion, paper_scheduler
from ddpm_plugin.pipelines.variational_bound import (
    approx_standard_normal_cdf,
    cumulative_rate_bpd,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    vb_terms_bpd,
)

DECODER_SIGMA = 0.0073846  # sqrt(beta_tilde_1) of the paper's schedule, to the 5 digits DESIGN quotes
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(paper_scheduler("digits").config)


class ConstantImageOracle(ModelMixin, ConfigMixin):
    """eps(x_t, t) of the true x_0, for data sets of constant images: x_0 is the candidate image whose level best
    explains the mean of x_t (certain at small t). With the true eps the model's mean is the posterior mean."""

    @register_to_config
    def __init__(self, levels: tuple[int, ...] = (0, 128, 255), sample_size: int = 8, in_channels: int = 1):
        super().__init__()
        self.register_buffer("x_levels", torch.tensor(levels, dtype=torch.float64) / 127.5 - 1.0)
        self.diffusion = GaussianDiffusion.from_config(paper_scheduler("digits").config)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> UNet2DOutput:
        t = t.long().expand(x_t.shape[0])
        sqrt_alpha_bar = torch.from_numpy(self.diffusion.sqrt_alphas_cumprod)[t].reshape(-1, 1, 1, 1)
        sqrt_one_minus = torch.from_numpy(self.diffusion.sqrt_one_minus_alphas_cumprod)[t].reshape(-1, 1, 1, 1)
        x_t = x_t.double()
        level = (x_t.mean(dim=(1, 2, 3), keepdim=True) / sqrt_alpha_bar - self.x_levels.reshape(1, -1)[..., None, None]).abs()
        x_start = self.x_levels[level.reshape(x_t.shape[0], -1).argmin(dim=1)].reshape(-1, 1, 1, 1)
        return UNet2DOutput(sample=((x_t - sqrt_alpha_bar * x_start) / sqrt_one_minus).float())


def paper_scheduler_with(variance_type: str) -> DDPMScheduler:
    return DDPMScheduler.from_config(paper_scheduler("digits").config, variance_type=variance_type)


def oracle_pipeline(variance_type: str) -> DDPMPaperPipeline:
    pipe = DDPMPaperPipeline(unet=ConstantImageOracle(), scheduler=paper_scheduler_with(variance_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def constant_images(levels=(0, 128, 255)) -> np.ndarray:
    return np.stack([np.full((8, 8, 1), level, dtype=np.uint8) for level in levels])


# --- Reference values (DESIGN §3). ---


@pytest.fixture(scope="module")
def decoder_log_scale(diffusion) -> torch.Tensor:
    """log sigma of the decoder: half the t=0 log variance, sigma = sqrt(beta_tilde_1) = 0.0073846."""
    return torch.tensor([0.5 * diffusion.model_log_variance("fixed_small")[0]], dtype=torch.float64)


def test_decoder_log_likelihood_at_zero_matches_reference(decoder_log_scale):
    log_p = discretized_gaussian_log_likelihood(
        torch.zeros(1, dtype=torch.float64), means=torch.zeros(1, dtype=torch.float64), log_scales=decoder_log_scale
    )
    assert log_p.item() == pytest.approx(-0.905018, abs=5e-7)


@pytest.mark.parametrize("edge", [-1.0, 1.0])
def test_decoder_edge_bins_are_open_and_match_reference(decoder_log_scale, edge):
    x = torch.tensor([edge], dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(x, means=x.clone(), log_scales=decoder_log_scale)
    assert log_p.item() == pytest.approx(-0.353441, abs=5e-7)
    # The open edge bin holds all the mass beyond the edge: a mean far outside still gives log p ~ 0.
    far = discretized_gaussian_log_likelihood(x, means=x * 3, log_scales=decoder_log_scale)
    assert far.item() == pytest.approx(0.0, abs=1e-9)


def test_decoder_log_likelihood_is_floored_far_from_the_mean(decoder_log_scale):
    log_p = discretized_gaussian_log_likelihood(
        torch.zeros(1, dtype=torch.float64), means=torch.ones(1, dtype=torch.float64), log_scales=decoder_log_scale
    )
    assert log_p.item() == pytest.approx(math.log(1e-12), rel=1e-6)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_decoder_sigma_is_sqrt_beta_tilde_1_for_both_variance_types(diffusion, variance_type):
    assert math.exp(0.5 * diffusion.model_log_variance(variance_type)[0]) == pytest.approx(DECODER_SIGMA, rel=1e-5)


def test_approx_standard_normal_cdf_is_close_to_the_exact_cdf():
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert torch.allclose(approx_standard_normal_cdf(x), exact, atol=2e-4)


def test_normal_kl_matches_closed_form():
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(4.0)), torch.tensor(0.0), torch.tensor(0.0))
    # KL(N(1, 4) || N(0, 1)) = 0.5 (4 + 1 - 1 - ln 4)
    assert kl.item() == pytest.approx(0.5 * (4 + 1 - 1 - math.log(4)))
    assert normal_kl(torch.tensor(0.3), torch.tensor(-2.0), torch.tensor(0.3), torch.tensor(-2.0)).item() == 0.0


def test_prior_term_is_of_order_1e_minus_5_bits_per_dim(diffusion):
    images = np.concatenate([constant_images((0, 255)), np.random.default_rng(0).integers(0, 256, (1, 8, 8, 1))])
    x_start = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1
    prior = prior_bpd(diffusion, x_start)
    assert ((prior > 1e-6) & (prior < 1e-4)).all(), prior
    # Closed form: 0.5 (-1 - log(1 - abar_T) + (1 - abar_T) + abar_T x^2) / ln 2, here for x = -1.
    abar = diffusion.alphas_cumprod[-1]
    assert prior[0].item() == pytest.approx(0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar) / LN2, rel=1e-9)


def test_vb_terms_match_the_numpy_coefficients(diffusion):
    # The same KL from GaussianDiffusion's NumPy q_posterior_mean_variance / predict_start_from_noise.
    rng = np.random.default_rng(0)
    t = np.array([1, 17, 500, 999])
    x_start = rng.integers(0, 256, (4, 1, 8, 8)) / 127.5 - 1
    x_t = diffusion.q_sample(x_start, t, rng.standard_normal((4, 1, 8, 8)))
    eps = rng.standard_normal((4, 1, 8, 8))
    terms, _ = vb_terms_bpd(
        diffusion, "fixed_large", model_output=torch.from_numpy(eps), x_start=torch.from_numpy(x_start),
        x_t=torch.from_numpy(x_t), t=torch.from_numpy(t),
    )
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    pred_x_start = np.clip(diffusion.predict_start_from_noise(x_t, t, eps), -1, 1)
    model_mean, _, _ = diffusion.q_posterior_mean_variance(pred_x_start, x_t, t)
    model_log_var = diffusion.model_log_variance("fixed_large")[t].reshape(-1, 1, 1, 1)
    kl = 0.5 * (-1 + model_log_var - true_log_var + np.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * np.exp(-model_log_var))
    np.testing.assert_allclose(terms.numpy(), kl.mean(axis=(1, 2, 3)) / LN2, rtol=1e-10, atol=1e-15)  # float64 rounding


def test_cumulative_rate_runs_from_the_prior_down_to_step_one():
    terms = np.array([[5.0, 1.0, 2.0, 3.0]])
    rate = cumulative_rate_bpd(terms, np.array([0.5]))
    np.testing.assert_allclose(rate, [[6.5, 6.5, 5.5, 3.5]])  # the decoder term 5.0 is distortion, not rate


# --- The pipeline's bound. ---


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_exact_model_has_zero_kl_and_the_reference_decoder_terms(batch_size):
    # With fixed_small and the true eps every KL term vanishes, and L_0 is the decoder's reference value:
    # 0.353441 nats for the edge levels 0 and 255, 0.905018 nats for the interior level 128.
    out = oracle_pipeline("fixed_small").bits_per_dim(constant_images(), batch_size=batch_size,
                                                       generator=torch.manual_seed(0))
    np.testing.assert_allclose(out.decoder_bpd, np.array([0.353441, 0.905018, 0.353441]) / LN2, atol=1e-5)
    assert np.abs(out.terms_bpd[:, 1:200]).max() < 1e-6


def test_exact_model_with_fixed_large_pays_the_variance_mismatch_in_closed_form(diffusion):
    out = oracle_pipeline("fixed_large").bits_per_dim(constant_images((0, 128)), batch_size=64,
                                                       generator=torch.manual_seed(0))
    # KL(N(mu, beta_tilde_t) || N(mu, beta_t)) per dimension, independent of the data.
    t = np.arange(1, 200)
    ratio = diffusion.posterior_variance[t] / diffusion.betas[t]
    expected = 0.5 * (-1 - np.log(ratio) + ratio) / LN2
    np.testing.assert_allclose(out.terms_bpd[:, 1:200], np.broadcast_to(expected, (2, 199)), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(out.decoder_bpd, np.array([0.353441, 0.905018]) / LN2, atol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_bound_pieces_sum_to_the_total(tiny_pipeline, variance_type):
    pipe = tiny_pipeline
    pipe.scheduler = paper_scheduler_with(variance_type)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    out = pipe.bits_per_dim(images, batch_size=100, generator=torch.manual_seed(0))
    assert out.terms_bpd.shape == out.x_start_mse.shape == (3, 1000)
    assert out.total_bpd.shape == out.prior_bpd.shape == out.decoder_bpd.shape == out.rate_bpd.shape == (3,)
    np.testing.assert_allclose(out.total_bpd, out.terms_bpd.sum(axis=1) + out.prior_bpd, rtol=1e-12)
    np.testing.assert_allclose(out.total_bpd, out.rate_bpd + out.decoder_bpd, rtol=1e-12)
    np.testing.assert_array_equal(out.decoder_bpd, out.terms_bpd[:, 0])
    assert (out.terms_bpd[:, 1:] >= 0).all() and np.isfinite(out.total_bpd).all()
    assert out.cumulative_rate_bpd[0] == pytest.approx(out.rate_bpd.mean())
    assert out.cumulative_rate_bpd[-1] == pytest.approx(out.prior_bpd.mean() + out.terms_bpd[:, -1].mean())
    assert np.all(np.diff(out.cumulative_rate_bpd) <= 0)  # rate only accumulates from T down
    # An untrained network is a poor model: more than the 8 bits/dim of a uniform distribution is normal.
    assert (out.total_bpd > 1.0).all()


def test_bound_is_deterministic_given_the_generator(tiny_pipeline):
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    a = tiny_pipeline.bits_per_dim(images, batch_size=50, generator=torch.manual_seed(3))
    b = tiny_pipeline.bits_per_dim(images, batch_size=50, generator=torch.manual_seed(3))
    c = tiny_pipeline.bits_per_dim(images, batch_size=50, generator=torch.manual_seed(4))
    np.testing.assert_array_equal(a.terms_bpd, b.terms_bpd)
    assert not np.array_equal(a.terms_bpd, c.terms_bpd)


def test_bits_per_dim_shows_a_progress_bar_over_unet_passes(capsys):
    pipe = oracle_pipeline("fixed_small")
    pipe.set_progress_bar_config(disable=False, ncols=80)
    pipe.bits_per_dim(constant_images((0, 255)), batch_size=500, generator=torch.manual_seed(0))
    assert "4/4" in capsys.readouterr().err  # 2 images x 1000 steps / 500 per pass


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 8, 8, 1), dtype=np.float32), "uint8"),
        (np.zeros((2, 9, 9, 1), dtype=np.uint8), "shape"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "shape"),
    ],
)
def test_bits_per_dim_rejects_images_it_cannot_score(tiny_pipeline, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline.bits_per_dim(images)


def test_bound_needs_a_fixed_variance(tiny_pipeline):
    tiny_pipeline.scheduler = paper_scheduler_with("learned")
    with pytest.raises(ValueError, match="variance_type"):
        tiny_pipeline.bits_per_dim(np.zeros((1, 8, 8, 1), dtype=np.uint8))


def test_rate_distortion_comes_from_the_same_pass(tiny_pipeline):
    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    curve = tiny_pipeline.rate_distortion(images, batch_size=100, generator=torch.manual_seed(0))
    bound = tiny_pipeline.bits_per_dim(images, batch_size=100, generator=torch.manual_seed(0))
    np.testing.assert_array_equal(curve.rate_bpd, bound.cumulative_rate_bpd)
    assert curve.total_rate_bpd + curve.total_distortion_bpd == pytest.approx(bound.total_bpd.mean())
    assert curve.distortion_rmse.shape == (1000,) and (curve.distortion_rmse >= 0).all()
    # The x_0 prediction from nearly clean x_1 is far better than from pure noise at T.
    assert curve.distortion_rmse[0] < curve.distortion_rmse[-1]


def test_saved_pipeline_carries_the_bound(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    assert {"variational_bound.py", "diffusion_ops.py", "gaussian_diffusion.py"} <= {p.name for p in tmp_path.iterdir()}
