"""`DDPMPaperPipeline.__call__`: stock equality, its added arguments (`latents`, callbacks, `start_timestep`), swapped
schedulers, input checks, and the network in bfloat16."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline


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


def test_generator_list_gives_per_image_reproducibility(tiny_pipeline):
    pipe = tiny_pipeline
    # torch.manual_seed returns the one global generator: separate images need separate Generator objects.
    both = pipe(batch_size=2, num_inference_steps=20, output_type="np",
                generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).images
    one = pipe(batch_size=1, num_inference_steps=20, output_type="np",
               generator=[torch.Generator().manual_seed(1)]).images
    assert np.allclose(both[1], one[0], atol=1e-6)


# --- Denoising a given x_t from a step of the schedule (reconstruction and interpolation use it). ---


def test_start_timestep_continues_an_interrupted_call_exactly(tiny_pipeline):
    # One loop: the state after 8 of 20 steps (x_t and the generator), continued from the next step of the same
    # schedule, gives the uninterrupted call's x_0.
    generator = torch.Generator().manual_seed(5)
    saved = {}

    def save_after_8_steps(pipe, i, t, tensors):
        if i == 7:
            saved.update(x_t=tensors["latents"].clone(), rng=generator.get_state())
        if i == 8:
            saved["t"] = int(t)
        return {}

    full = tiny_pipeline(batch_size=2, num_inference_steps=20, generator=generator, output_type="latent",
                         callback_on_step_end=save_after_8_steps).images
    generator.set_state(saved["rng"])
    rest = tiny_pipeline(batch_size=2, num_inference_steps=20, generator=generator, output_type="latent",
                         latents=saved["x_t"], start_timestep=saved["t"]).images
    assert tiny_pipeline.num_timesteps == 12
    assert torch.equal(rest, full)


def test_start_timestep_runs_the_callbacks_and_eta_of_the_one_loop(tiny_pipeline):
    tiny_pipeline.scheduler = DDIMScheduler.from_config(tiny_pipeline.scheduler.config)
    x_t = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = []
    deterministic = [
        tiny_pipeline(latents=x_t, start_timestep=300, num_inference_steps=10, generator=torch.manual_seed(s),
                      output_type="np", callback_on_step_end=lambda p, i, t, k: steps.append((i, int(t))) or {}).images
        for s in (1, 2)
    ]
    assert steps[:4] == [(0, 300), (1, 200), (2, 100), (3, 0)]
    np.testing.assert_array_equal(*deterministic)  # eta = 0: DDIM adds no noise
    stochastic = tiny_pipeline(latents=x_t, start_timestep=300, num_inference_steps=10, eta=1.0,
                               generator=torch.manual_seed(1), output_type="np").images
    assert not np.array_equal(deterministic[0], stochastic)


def test_schedule_timestep_leaves_the_scheduler_as_it_was(tiny_pipeline):
    tiny_pipeline(num_inference_steps=4, output_type="np")
    before = tiny_pipeline.scheduler.timesteps.clone()
    assert tiny_pipeline.schedule_timestep(999, num_inference_steps=10) == 900
    assert torch.equal(tiny_pipeline.scheduler.timesteps, before) and tiny_pipeline.scheduler.num_inference_steps == 4


# --- bfloat16: the network in bf16, x_t, the noise and the step in float32. ---


def test_bf16_network_keeps_x_t_and_the_step_in_float32(tiny_pipeline_factory):
    fp32, bf16 = tiny_pipeline_factory(), tiny_pipeline_factory().to(torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16
    dtypes = set()

    def record(pipe, i, t, tensors):
        dtypes.update(tensor.dtype for tensor in tensors.values())
        return {}

    kwargs = {"batch_size": 4, "num_inference_steps": 50, "output_type": "np"}
    expected = fp32(generator=torch.manual_seed(0), **kwargs).images
    actual = bf16(generator=torch.manual_seed(0), callback_on_step_end=record,
                  callback_on_step_end_tensor_inputs=bf16._callback_tensor_inputs, **kwargs).images
    assert dtypes == {torch.float32}
    # Measured on this network: 0.0019 mean and 0.015 max absolute difference (pixels in [0, 1]).
    assert np.abs(actual - expected).mean() < 0.01 and np.abs(actual - expected).max() < 0.1
    assert not np.array_equal(actual, expected)  # the network did run in bf16


def test_bf16_loaded_with_dtype_samples_close_to_fp32(tiny_pipeline_dir):
    from ddpm_plugin import DDPMPaperPipeline

    fp32 = DDPMPaperPipeline.from_pretrained(tiny_pipeline_dir)
    bf16 = DDPMPaperPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.scheduler.alphas_cumprod.dtype == torch.float32
    kwargs = {"batch_size": 2, "num_inference_steps": 20, "output_type": "latent"}
    for pipe in (fp32, bf16):
        pipe.set_progress_bar_config(disable=True)
    expected = fp32(generator=torch.manual_seed(1), **kwargs).images
    actual = bf16(generator=torch.manual_seed(1), **kwargs).images
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=0.05, rtol=0)  # measured: 0.026 max on the [-1, 1] scale


def test_bf16_bound_stays_close_to_fp32_with_float64_terms(tiny_pipeline_factory):
    fp32, bf16 = tiny_pipeline_factory(), tiny_pipeline_factory().to(torch.bfloat16)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    expected = fp32.bits_per_dim(images, batch_size=500, generator=torch.manual_seed(0))
    actual = bf16.bits_per_dim(images, batch_size=500, generator=torch.manual_seed(0))
    assert actual.terms_bpd.dtype == np.float64
    # Measured: 0.002 % and 0.16 % on the two images' totals of about 11.8 bits/dim.
    np.testing.assert_allclose(actual.total_bpd, expected.total_bpd, rtol=0.01)
    assert not np.array_equal(actual.total_bpd, expected.total_bpd)



# --- Time-step-aware precision: bf16 under autocast, float32 for t < float32_below_t. ---


def test_float32_below_t_runs_small_t_in_float32_and_the_rest_under_autocast(tiny_pipeline):
    x_t = torch.randn(4, 1, 8, 8, generator=torch.manual_seed(0))
    t = torch.tensor([0, 9, 10, 500])
    with torch.no_grad():
        fp32 = tiny_pipeline.unet(x_t, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = tiny_pipeline.unet(x_t, t).sample.float()
            scheduled = tiny_pipeline.predict_eps(x_t, t, float32_below_t=10)
    assert scheduled.dtype == torch.float32
    # Half of the batch at a time: float32 moves by ~2e-6 with the batch size, bf16 by ~1e-2 from float32.
    torch.testing.assert_close(scheduled[:2], fp32[:2], atol=2e-5, rtol=0)  # t = 0, 9: float32
    torch.testing.assert_close(scheduled[2:], bf16[2:], atol=2e-5, rtol=0)  # t = 10, 500: bf16
    assert not torch.allclose(bf16[:2], fp32[:2], atol=1e-3)  # so the first two did not run in bf16


def test_float32_below_t_in_sampling_and_in_the_bound(tiny_pipeline):
    kwargs = {"batch_size": 2, "num_inference_steps": 10, "output_type": "latent"}
    run = lambda **extra: tiny_pipeline(generator=torch.manual_seed(0), **kwargs, **extra).images  # noqa: E731
    fp32 = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, all_float32 = run(), run(float32_below_t=1000)
    torch.testing.assert_close(all_float32, fp32, atol=1e-5, rtol=0)  # every step below 1000: float32 throughout
    assert not torch.allclose(bf16, fp32, atol=1e-5)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    bound = lambda **extra: tiny_pipeline.bits_per_dim(images, batch_size=500, generator=torch.manual_seed(0), **extra)  # noqa: E731
    fp32_terms = bound().terms_bpd
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_terms, scheduled_terms = bound().terms_bpd, bound(float32_below_t=10).terms_bpd
    np.testing.assert_allclose(scheduled_terms[:, :10], fp32_terms[:, :10], rtol=1e-4)
    np.testing.assert_allclose(scheduled_terms[:, 10:], bf16_terms[:, 10:], rtol=1e-4)
    assert not np.allclose(bf16_terms[:, :10], fp32_terms[:, :10], rtol=1e-3)


@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_float32_below_t_must_be_a_whole_number(tiny_pipeline, value):
    with pytest.raises(ValueError, match="float32_below_t"):
        tiny_pipeline(num_inference_steps=2, float32_below_t=value)


def test_float32_below_t_with_bf16_weights_runs_a_float32_copy_kept_in_step_with_them(tiny_pipeline):
    x_t = torch.randn(2, 1, 8, 8, generator=torch.manual_seed(0))
    t = torch.tensor([3, 700])
    tiny_pipeline.to(torch.bfloat16)
    with torch.no_grad():
        copy = tiny_pipeline.float32_network()
        assert copy.dtype == torch.float32 and tiny_pipeline.unet.dtype == torch.bfloat16
        assert tiny_pipeline.float32_network() is copy  # made once
        scheduled = tiny_pipeline.predict_eps(x_t, t, float32_below_t=10)
        torch.testing.assert_close(scheduled[:1], copy(x_t[:1], t[:1]).sample, atol=1e-6, rtol=0)
        torch.testing.assert_close(scheduled[1:], tiny_pipeline.unet(x_t[1:].bfloat16(), t[1:]).sample.float(), atol=1e-6, rtol=0)
        tiny_pipeline.unet.conv_out.bias.add_(1.0)  # new weights: a new copy
        fresh = tiny_pipeline.float32_network()
    assert fresh is not copy and torch.equal(fresh.conv_out.bias, tiny_pipeline.unet.conv_out.bias.float())
