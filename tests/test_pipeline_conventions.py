"""diffusers' pipeline conventions, one test each: callback tensor inputs and callback objects, input checks before any
work, `output_type="latent"`, pickled and variant weights as `save_pretrained` writes them, `from_pretrained`'s
arguments, and eval mode."""

import contextlib
import inspect
import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ddpm_plugin import DDPMPaperPipeline


class RecordLatents(PipelineCallback):
    """Records the step indices it sees and the tensors it is given."""

    tensor_inputs = ["latents", "model_output"]

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen.append((step_index, sorted(callback_kwargs)))
        return callback_kwargs


class ZeroLastLatents(PipelineCallback):
    """Replaces x_0 by zeros at the last step, found with `pipeline.num_timesteps` as diffusers' callbacks do."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == pipeline.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs


class AskForNoise(PipelineCallback):
    tensor_inputs = ["noise"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return callback_kwargs


def test_callback_receives_every_declared_tensor_input(tiny_pipeline):
    assert DDPMPaperPipeline._callback_tensor_inputs == ["latents", "model_output", "pred_original_sample"]
    received = []

    def record(pipe, i, t, tensors):
        received.append({name: tensor.shape for name, tensor in tensors.items()})
        return {}

    tiny_pipeline(batch_size=2, num_inference_steps=3, output_type="np", callback_on_step_end=record,
                  callback_on_step_end_tensor_inputs=tiny_pipeline._callback_tensor_inputs)
    assert len(received) == 3
    assert received[0] == dict.fromkeys(tiny_pipeline._callback_tensor_inputs, torch.Size([2, 1, 8, 8]))


def test_pipeline_callback_object_gets_its_own_tensor_inputs(tiny_pipeline):
    callback = RecordLatents()
    # The object's `tensor_inputs` win over the call's argument, as in diffusers' pipelines.
    tiny_pipeline(num_inference_steps=4, output_type="np", callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=["pred_original_sample"])
    assert callback.seen == [(i, ["latents", "model_output"]) for i in range(4)]
    assert tiny_pipeline.num_timesteps == 4


def test_multi_pipeline_callbacks_run_in_order_and_replace_latents(tiny_pipeline):
    record, zero = RecordLatents(), ZeroLastLatents()
    out = tiny_pipeline(num_inference_steps=5, output_type="latent",
                        callback_on_step_end=MultiPipelineCallbacks([record, zero]))
    assert len(record.seen) == 5
    assert torch.count_nonzero(out.images) == 0
    plain = tiny_pipeline(num_inference_steps=5, output_type="latent", callback_on_step_end=record)
    assert torch.count_nonzero(plain.images) > 0


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
        ({"start_timestep": 500}, "`start_timestep` needs `latents`"),
        ({"start_timestep": 550, "latents": torch.zeros(1, 1, 8, 8)}, "`start_timestep` must be a step of the 2-step"),
        ({"start_timestep": 1000, "latents": torch.zeros(1, 1, 8, 8)}, "`start_timestep` must be a step"),
        ({"callback_on_step_end": AskForNoise()}, "callback_on_step_end_tensor_inputs"),
        ({"callback_on_step_end": MultiPipelineCallbacks([RecordLatents(), AskForNoise()])},
         "callback_on_step_end_tensor_inputs"),
        ({"callback_on_step_end": lambda *args: {}, "callback_on_step_end_tensor_inputs": "latents"},
         "callback_on_step_end_tensor_inputs"),
        ({"callback_on_step_end": "latents"}, "callback_on_step_end"),
    ],
)
def test_bad_arguments_are_refused_before_sampling(tiny_pipeline, kwargs, message):
    calls = []
    tiny_pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(**{"num_inference_steps": 2, **kwargs})
    assert not calls


def test_latent_output_is_the_final_x0_unprocessed(tiny_pipeline):
    last = {}

    def keep_last(pipe, i, t, tensors):
        last["latents"] = tensors["latents"]
        return {}

    latent = tiny_pipeline(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(4), output_type="latent",
                           callback_on_step_end=keep_last).images
    pt = tiny_pipeline(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(4), output_type="pt").images
    assert isinstance(latent, torch.Tensor) and latent.shape == (2, 1, 8, 8)
    assert torch.equal(latent, last["latents"])
    assert torch.equal((latent / 2 + 0.5).clamp(0, 1), pt)
    as_tuple = tiny_pipeline(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(4),
                             output_type="latent", return_dict=False)
    assert torch.equal(as_tuple[0], latent)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_variant_weights_save_and_load_by_name(tiny_pipeline, tmp_path, safe_serialization):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_pipeline.save_pretrained(tmp_path, variant="ema", safe_serialization=safe_serialization)
    assert sum("pickled" in str(warning.message) for warning in caught) == (not safe_serialization)
    weights = sorted(path.name for path in (tmp_path / "unet").iterdir() if path.suffix != ".json")
    expected = ["diffusion_pytorch_model.ema.safetensors"]
    assert weights == (expected if safe_serialization else ["diffusion_pytorch_model.ema.bin", *expected])
    # The saved-folder policy holds for variants too: stock classes recorded, the pipeline's own file in the root.
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert (tmp_path / "pipeline_ddpm_paper.py").is_file()
    loaded = DDPMPaperPipeline.from_pretrained(tmp_path, variant="ema")
    for name, tensor in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="variant=fp16"):
        DDPMPaperPipeline.from_pretrained(tmp_path, variant="fp16")


def test_from_pretrained_has_the_stock_signature_and_passes_arguments_on(tiny_pipeline_dir):
    ours = inspect.signature(DDPMPaperPipeline.from_pretrained).parameters
    stock = inspect.signature(DiffusionPipeline.from_pretrained).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in stock.values()]
    pipe = DDPMPaperPipeline.from_pretrained(tiny_pipeline_dir, dtype={"unet": torch.bfloat16}, local_files_only=True,
                                             low_cpu_mem_usage=False, revision=None, cache_dir=None)
    assert pipe.unet.dtype == torch.bfloat16
    deprecated = int(diffusers.__version__.split(".")[1]) >= 40  # diffusers 0.40 made `torch_dtype` an alias
    with pytest.warns(FutureWarning, match="torch_dtype") if deprecated else contextlib.nullcontext():
        pipe = DDPMPaperPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float64)
    assert pipe.unet.dtype == torch.float64
    with pytest.raises(ValueError, match="variant=fp16"):
        DDPMPaperPipeline.from_pretrained(tiny_pipeline_dir, variant="fp16")


@pytest.fixture
def dropout_pipeline(tiny_pipeline) -> DDPMPaperPipeline:
    """The tiny pipeline's network with dropout 0.5, left in training mode, as a user may build it."""
    unet = UNet2DModel.from_config({**tiny_pipeline.unet.config, "dropout": 0.5})
    unet.load_state_dict(tiny_pipeline.unet.state_dict())
    pipe = DDPMPaperPipeline(unet=unet.train(), scheduler=tiny_pipeline.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded() -> torch.Generator:
    """A fresh seeded generator: `torch.manual_seed` would reseed the global RNG that dropout draws from too, and
    hide the difference dropout makes between two calls."""
    return torch.Generator().manual_seed(0)


IMAGES = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
UNET_METHODS = {
    "sample": lambda pipe: pipe(batch_size=2, num_inference_steps=10, generator=seeded(), output_type="np").images,
    "progressive_generation": lambda pipe: pipe.progressive_generation(
        batch_size=1, num_inference_steps=10, every=5, generator=seeded()).pred_original_sample,
    "bits_per_dim": lambda pipe: pipe.bits_per_dim(IMAGES, batch_size=500, generator=seeded()).total_bpd,
    "rate_distortion": lambda pipe: pipe.rate_distortion(IMAGES[:1], batch_size=1000, generator=seeded()).rate_bpd,
    "reconstruct": lambda pipe: pipe.reconstruct(IMAGES, timestep=300, num_samples=2, num_inference_steps=10,
                                                 generator=seeded()).images,
    "interpolate": lambda pipe: pipe.interpolate(IMAGES[0], IMAGES[1], timestep=300, lambdas=[0.0, 0.5],
                                                 num_inference_steps=10, generator=seeded()).images,
}


def test_dropout_is_live_in_training_mode(dropout_pipeline):
    # The premise of the eval-mode test: this network's dropout changes its output in training mode.
    unet = dropout_pipeline.unet
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert not torch.equal(unet(x, t).sample, unet(x, t).sample)


@pytest.mark.parametrize("method", sorted(UNET_METHODS))
def test_pipeline_runs_the_unet_in_eval_mode_and_restores_the_callers_modes(dropout_pipeline, method):
    pipe = dropout_pipeline
    pipe.unet.mid_block.eval()  # a mixed state, to be given back as it was
    modes = {name: module.training for name, module in pipe.unet.named_modules()}
    first, second = UNET_METHODS[method](pipe), UNET_METHODS[method](pipe)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert {name: module.training for name, module in pipe.unet.named_modules()} == modes
    assert pipe.unet.training and not pipe.unet.mid_block.training


def test_callers_modes_are_restored_when_a_call_fails(dropout_pipeline):
    pipe = dropout_pipeline
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0)
    assert all(module.training for module in pipe.unet.modules())
