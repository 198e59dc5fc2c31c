"""DPM-Solver++ (second-order multistep, data prediction) in the NumPy sampler: its timesteps and every step match
diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`, and `ddpm sample
--sampler dpmsolver++` works on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DModel
from PIL import Image

from ddpm_plugin.bundled import resolve_model
from ddpm_plugin.cli import main
from ddpm_plugin.export.numpy_sampler import dpm_solver_step_function, dpm_solver_timesteps
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.vocabulary import SCHEDULER_CONFIG

SPACINGS = [{"timestep_spacing": "leading"}, {"timestep_spacing": "leading", "steps_offset": 1},
            {"timestep_spacing": "linspace"}, {"timestep_spacing": "trailing"}]


@pytest.fixture(scope="module")
def digits():
    """The bundled digits model: its folder, its UNet on PyTorch and its scheduler configuration."""
    folder = Path(resolve_model("digits"))
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    return folder, unet, json.loads((folder / SCHEDULER_CONFIG).read_text())


def diffusers_solver(config: dict, num_inference_steps: int) -> DPMSolverMultistepScheduler:
    scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda options: "+".join(map(str, options.values())))
@pytest.mark.parametrize("num_inference_steps", [1, 2, 5, 10, 15, 20, 50, 333, 998])
def test_timesteps_match_diffusers(digits, spacing, num_inference_steps):
    config = dict(digits[2], **spacing)
    np.testing.assert_array_equal(dpm_solver_timesteps(config, num_inference_steps),
                                  diffusers_solver(config, num_inference_steps).timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_a_step_count_that_repeats_a_timestep_is_refused(digits, spacing):
    config = dict(digits[2], timestep_spacing=spacing)
    assert len(set(diffusers_solver(config, 1000).timesteps.tolist())) < 1000  # diffusers repeats timesteps
    with pytest.raises(ValueError, match=rf"`num_inference_steps` 1000 is too many for dpmsolver\+\+ with "
                                         rf"timestep_spacing '{spacing}'.*use fewer steps"):
        dpm_solver_timesteps(config, 1000)


def test_a_step_count_past_the_last_timestep_is_refused(digits):
    config = dict(digits[2], timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError, match=r"it would visit t=1000 \(steps_offset 1\), past the last timestep"):
        dpm_solver_timesteps(config, 999)


@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda options: "+".join(map(str, options.values())))
@pytest.mark.parametrize("num_inference_steps", [5, 10, 15, 20])
def test_every_step_matches_diffusers_given_the_same_eps(digits, spacing, num_inference_steps):
    _, unet, config = digits
    config = dict(config, **spacing)
    scheduler = diffusers_solver(config, num_inference_steps)
    diffusion, timesteps = GaussianDiffusion.from_config(config), dpm_solver_timesteps(config, num_inference_steps)
    step = dpm_solver_step_function(diffusion, config, timesteps)
    trajectory_step = dpm_solver_step_function(diffusion, config, timesteps)  # each keeps its own x_0 history
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_numpy = x_t.numpy().copy()
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            eps = unet(x_t, t).sample
        # One step from diffusers' x_t: the update rule alone (float64 coefficients vs diffusers' float32).
        x_prev, _ = step(i, x_t.numpy(), eps.numpy(), None)
        # The NumPy trajectory on its own, from the same eps: adds float32 rounding of x_t, which dividing by
        # alpha_t near t = T magnifies.
        x_numpy = trajectory_step(i, x_numpy, eps.numpy(), None)[0].astype(np.float32)
        x_t = scheduler.step(eps, t, x_t).prev_sample
        np.testing.assert_allclose(x_prev, x_t.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(x_numpy, x_t.numpy(), rtol=0, atol=1e-4)


def test_the_onnx_pipeline_matches_the_pytorch_pipeline(digits):
    from ddpm_plugin.sampling import load_pipeline

    folder = digits[0]
    torch_pipe = load_pipeline(folder, "dpmsolver++")
    assert isinstance(torch_pipe.scheduler, DPMSolverMultistepScheduler)
    assert torch_pipe.scheduler.config.algorithm_type == "dpmsolver++" and torch_pipe.scheduler.config.solver_order == 2
    onnx_pipe = OnnxDDPMPipeline.from_pretrained(folder, provider="cpu", num_threads=1)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = torch_pipe(batch_size=3, latents=latents, num_inference_steps=10, output_type="np").images
    actual = onnx_pipe(batch_size=3, latents=latents.numpy(), num_inference_steps=10, scheduler="dpmsolver++",
                       progress_bar=False).images
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["onnxruntime", "pytorch"])
def test_cli_samples_with_dpmsolver(tmp_path, backend):
    output = tmp_path / "grid.png"
    assert main(["sample", "--model", "digits", "--sampler", "dpmsolver++", "--steps", "10", "--num-images",
                 "4", "--backend", backend, "--scale", "1", "--output", str(output)]) == 0
    grid = np.asarray(Image.open(output))
    assert grid.shape[:2] == (2 * 9 + 1, 2 * 9 + 1) and grid.std() > 20  # digits, not a flat picture


def test_cli_refuses_eta_and_too_many_steps_for_dpmsolver(tmp_path, capsys):
    output = str(tmp_path / "grid.png")
    assert main(["sample", "--model", "digits", "--sampler", "dpmsolver++", "--eta", "0.5", "--output", output]) == 2
    assert "the DPM-Solver++ sampler has none" in capsys.readouterr().err
    assert main(["sample", "--model", "digits", "--sampler", "dpmsolver++", "--steps", "1000",
                 "--output", output]) == 2
    assert "is too many for dpmsolver++ with timestep_spacing 'leading'" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_pytorch_pipeline_gives_callbacks_the_predicted_x0_of_dpmsolver(digits):
    """DPM-Solver++'s step returns no `pred_original_sample`: the pipeline gives callbacks x_0 from eps (Eq. 15),
    which for this solver is exactly its final sample."""
    from ddpm_plugin.sampling import load_pipeline

    pipe = load_pipeline(digits[0], "dpmsolver++")
    seen = []

    def on_step_end(pipe, i, t, tensors):
        seen.append(tensors["pred_original_sample"].clone())
        return {}

    latents = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="latent",
                   callback_on_step_end=on_step_end,
                   callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"]).images
    assert len(seen) == 5
    torch.testing.assert_close(seen[-1], latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["onnxruntime", "pytorch"])
def test_demo_generates_with_dpmsolver_and_offers_it_first(digits, backend):
    from ddpm_plugin.demo.app import DEFAULT_SAMPLER, FEW_STEPS
    from ddpm_plugin.demo.backends import DemoEngine, GenerationRequest

    engine = DemoEngine([digits[0]], max_images=4, num_threads=1)
    assert "dpmsolver++" in engine.describe()["samplers"]
    generation = engine.generate(GenerationRequest(digits[0].name, backend=backend, sampler="dpmsolver++",
                                                   num_inference_steps=10, num_images=2, seed=3))
    assert generation.images.shape == (2, 8, 8, 1) and generation.images.std() > 0.1
    assert generation.timesteps[-1] == dpm_solver_timesteps(digits[2], 10)[-1]  # the solver's last timestep
    assert (DEFAULT_SAMPLER, FEW_STEPS[DEFAULT_SAMPLER]) == ("dpmsolver++", 10)
