import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline

from conftest import make_tiny_pipeline


def test_default_call_equals_stock_ddpm_pipeline(tiny_pipeline):
    stock = DDPMPipeline(unet=tiny_pipeline.unet, scheduler=tiny_pipeline.scheduler)
    stock.set_progress_bar_config(disable=True)
    ours = tiny_pipeline(batch_size=3, generator=torch.manual_seed(7), num_inference_steps=1000, output_type="np")
    theirs = stock(batch_size=3, generator=torch.manual_seed(7), num_inference_steps=1000, output_type="np")
    assert np.array_equal(ours.images, theirs.images)


def test_default_call_returns_pil_images(tiny_pipeline):
    images = tiny_pipeline(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (8, 8)


def test_given_latents_are_the_starting_noise(tiny_pipeline):
    # Drawing x_T ourselves from the generator, then continuing with it, reproduces the default path.
    generator = torch.manual_seed(1)
    latents = torch.randn(2, 1, 8, 8, generator=generator)
    given = tiny_pipeline(batch_size=2, latents=latents, num_inference_steps=10, generator=generator, output_type="np")
    drawn = tiny_pipeline(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(1), output_type="np")
    assert np.array_equal(given.images, drawn.images)
    other = tiny_pipeline(batch_size=2, latents=-latents, num_inference_steps=10, generator=torch.manual_seed(9),
                          output_type="np")
    assert not np.array_equal(given.images, other.images)


def test_callback_on_step_end_sees_and_replaces_latents(tiny_pipeline):
    calls = []

    def zero_out(pipe, i, t, tensors):
        calls.append((i, int(t), sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = tiny_pipeline(batch_size=1, num_inference_steps=4, output_type="np", callback_on_step_end=zero_out,
                        callback_on_step_end_tensor_inputs=["latents", "model_output", "pred_original_sample"])
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert calls[0][2] == ["latents", "model_output", "pred_original_sample"]
    assert np.allclose(out.images, 0.5)  # zeros map to mid-grey


def test_progressive_generation_keeps_snapshots_every_k_steps(tiny_pipeline):
    out = tiny_pipeline.progressive_generation(batch_size=2, num_inference_steps=100, every=25,
                                               generator=torch.manual_seed(0))
    assert out.timesteps == [750, 500, 250, 0]
    assert out.x_t.shape == out.pred_original_sample.shape == (4, 2, 8, 8, 1)
    assert np.array_equal(out.x_t[-1], out.images)


def test_ddim_scheduler_swaps_in_with_50_steps(tiny_pipeline):
    tiny_pipeline.scheduler = DDIMScheduler.from_config(tiny_pipeline.scheduler.config)
    steps = []
    tiny_pipeline(batch_size=2, num_inference_steps=50, output_type="np",
                  callback_on_step_end=lambda p, i, t, k: steps.append(int(t)) or {})
    assert len(steps) == 50 and steps[-1] == 0
    a = tiny_pipeline(batch_size=1, num_inference_steps=50, generator=torch.manual_seed(3), output_type="np").images
    b = tiny_pipeline(batch_size=1, num_inference_steps=50, generator=torch.manual_seed(3), output_type="np").images
    assert np.array_equal(a, b)  # eta=0 is deterministic given x_T
    c = tiny_pipeline(batch_size=1, num_inference_steps=50, generator=torch.manual_seed(3), output_type="np",
                      eta=1.0).images
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"batch_size": 2, "latents": torch.randn(2, 3, 8, 8)}, "latents"),
        ({"batch_size": 3, "generator": [torch.Generator(), torch.Generator()]}, "generator"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_get_clear_errors(tiny_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(**kwargs)


def test_generator_list_gives_per_image_reproducibility():
    pipe = make_tiny_pipeline()
    # torch.manual_seed returns the one global generator: separate images need separate Generator objects.
    both = pipe(batch_size=2, num_inference_steps=20, output_type="np",
                generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).images
    one = pipe(batch_size=1, num_inference_steps=20, output_type="np",
               generator=[torch.Generator().manual_seed(1)]).images
    assert np.allclose(both[1], one[0], atol=1e-6)
