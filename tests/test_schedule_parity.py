"""Every `DDPMScheduler` setting the allow-list accepts is modelled alike by diffusers' scheduler (PyTorch sampling),
the float64 schedule (training's q(x_t | x_0) and the bound) and the NumPy sampler (ONNX Runtime)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddpm_plugin import DDPMPaperPipeline, GaussianDiffusion, paper_scheduler
from ddpm_plugin.export.onnx_export import export_onnx
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
from ddpm_plugin.pipelines.variational_bound import clip_range_of, p_mean_log_variance

# One entry per accepted value that differs from the paper's (the paper's own configuration comes first).
MODELLED = {
    "paper": {},
    "scaled_linear": {"beta_schedule": "scaled_linear"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": np.linspace(2e-4, 0.03, 1000).tolist()},
    "T=500": {"num_train_timesteps": 500},
    "fixed_small": {"variance_type": "fixed_small"},
    "fixed_small_log": {"variance_type": "fixed_small_log"},
    "no_clip": {"clip_sample": False},
    "clip_0.5": {"clip_sample_range": 0.5},
    "linspace": {"timestep_spacing": "linspace"},
    "trailing": {"timestep_spacing": "trailing"},
    "steps_offset": {"steps_offset": 1},
}
BETA_OPTIONS = ["paper", "scaled_linear", "cosine", "trained_betas", "T=500"]
CLIP_OPTIONS = ["paper", "no_clip", "clip_0.5"]


@pytest.fixture(scope="module")
def onnx_session(tiny_pipeline_dir, tmp_path_factory):
    """The tiny network on ONNX Runtime, and the metadata of its export."""
    folder = export_onnx(tiny_pipeline_dir, tmp_path_factory.mktemp("onnx") / "onnx", seed=0).output_dir
    pipe = OnnxDDPMPipeline.from_pretrained(folder, provider="cpu", num_threads=1)
    return pipe.session, pipe.metadata


def replayed_torch_noise(seed: int) -> SimpleNamespace:
    """A NumPy-sampler `generator` drawing N(0, I) exactly as diffusers' schedulers draw it from a seeded CPU
    `torch.Generator`, so both samplers get the same per-step noise."""
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(standard_normal=lambda shape, dtype: torch.randn(tuple(shape), generator=generator).numpy())


@pytest.mark.parametrize("name", list(MODELLED))
def test_numpy_sampler_matches_pytorch_sampling_for_every_accepted_setting(tiny_pipeline_dir, onnx_session, name):
    scheduler = paper_scheduler("digits", **MODELLED[name])
    torch_pipe = DDPMPaperPipeline.from_pretrained(tiny_pipeline_dir, scheduler=scheduler)
    torch_pipe.set_progress_bar_config(disable=True)
    session, metadata = onnx_session
    numpy_pipe = OnnxDDPMPipeline(session, dict(scheduler.config), metadata)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = torch_pipe(batch_size=2, latents=latents, num_inference_steps=10, generator=torch.manual_seed(7),
                          output_type="np").images
    actual = numpy_pipe(batch_size=2, latents=latents.numpy(), num_inference_steps=10,
                        generator=replayed_torch_noise(7), progress_bar=False).images
    # The same as the paper configuration's parity in test_onnx_pipeline: float64 NumPy vs diffusers' float32.
    assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.parametrize("name", BETA_OPTIONS)
def test_training_schedule_matches_the_schedulers_for_every_beta_setting(name):
    # Training's q(x_t | x_0) and the bound read alpha_bar_t from the float64 schedule; diffusers keeps float32.
    scheduler = paper_scheduler("digits", **MODELLED[name])
    diffusion = GaussianDiffusion.from_config(scheduler.config)
    assert diffusion.num_timesteps == scheduler.config.num_train_timesteps
    np.testing.assert_allclose(diffusion.alphas_cumprod, scheduler.alphas_cumprod.double().numpy(), rtol=5e-5)


@pytest.mark.parametrize("name", CLIP_OPTIONS)
def test_bound_predicts_x0_and_the_last_mean_as_the_scheduler_steps(name):
    # The bound's p_theta(x_{t-1} | x_t) is the sampler's: x_0 clipped as `DDPMScheduler.step` clips it (or not),
    # and at t = 0, where the step adds no noise, the same mean.
    scheduler = paper_scheduler("digits", **MODELLED[name])
    diffusion = GaussianDiffusion.from_config(scheduler.config)
    rng = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=rng) * 2, torch.randn(2, 1, 8, 8, generator=rng)
    for t in (0, 700):
        step = scheduler.step(eps, t, x_t, generator=torch.manual_seed(0))
        mean, _, pred_x_start = p_mean_log_variance(
            diffusion, scheduler.config.variance_type, eps, x_t, torch.full((2,), t), clip_range_of(scheduler.config)
        )
        torch.testing.assert_close(pred_x_start.float(), step.pred_original_sample, rtol=1e-5, atol=1e-5)
        if t == 0:
            torch.testing.assert_close(mean.float(), step.prev_sample, rtol=1e-5, atol=1e-5)
    assert (pred_x_start.abs().max() > 1) == (name == "no_clip")  # the case tells the clipping apart


def test_bits_per_dim_follows_the_schedulers_clipping(tiny_pipeline):
    images = np.random.default_rng(0).integers(0, 256, (1, 8, 8), dtype=np.uint8)
    clipped = tiny_pipeline.bits_per_dim(images, batch_size=1000, generator=torch.manual_seed(0))
    tiny_pipeline.scheduler = paper_scheduler("digits", clip_sample=False)
    unclipped = tiny_pipeline.bits_per_dim(images, batch_size=1000, generator=torch.manual_seed(0))
    # From x_T the network's x_0 prediction leaves [-1, 1] by far; clipped, its error is at most 2 per pixel.
    assert clipped.x_start_mse[0, -1] <= 4 < unclipped.x_start_mse[0, -1]
    assert not np.array_equal(clipped.total_bpd, unclipped.total_bpd)
