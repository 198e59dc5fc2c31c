"""Loading a pipeline folder for sampling, with a chosen sampler and backend, and drawing images by index.

An [`ImageSampler`] draws images start..start+count-1 of a run. Each image has its own noise stream, seeded
from (`seed`, image index) only: its x_T and every step's z come from that stream, so image i is the same
whichever batch, shard or process draws it (bitwise, for the same batch composition, backend and threads).
The PyTorch and ONNX Runtime backends draw their streams with different generators (torch vs NumPy), so
the same seed gives different, equally distributed, images on the two.

Torch and diffusers are imported only by the PyTorch backend: ONNX Runtime sampling works without torch.
`ddpm_plugin.export.sampler.open_sampler` opens either backend.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from .images import make_grid, to_uint8
from .model_folder import check_pipeline_folder, check_schedule_size
from .pipelines.gaussian_diffusion import GaussianDiffusion
from .trust import file_sha256, read_json, regular_file, regular_files
from .vocabulary import (
    ONNX_BACKENDS,
    ONNX_METADATA_FILE,
    ONNX_SUBFOLDER,
    SCHEDULER_CONFIG,
    Backend,
    Sampler,
    VarianceType,
    check_sampler,
)

if TYPE_CHECKING:
    from .pipelines.pipeline_ddpm_paper import DDPMPaperPipeline

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed and NumPy's SeedSequence both take 0..2**63-1


def with_scheduler(
    pipe: "DDPMPaperPipeline", scheduler: Sampler, variance_type: VarianceType | None = None
) -> "DDPMPaperPipeline":
    """A pipeline sharing `pipe`'s network with a scheduler of its own, so that concurrent callers never change
    each other's timesteps: the paper's `DDPMScheduler` (`"ddpm"`, with `variance_type` when given), a
    `DDIMScheduler` (`"ddim"`) or a second-order DPM-Solver++ (`"dpmsolver++"`) of the same training schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    check_sampler(scheduler)
    config = pipe.scheduler.config
    if scheduler == "ddim":
        new_scheduler = DDIMScheduler.from_config(config)
    elif scheduler == "dpmsolver++":
        new_scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    elif variance_type is not None:
        new_scheduler = DDPMScheduler.from_config(config, variance_type=variance_type)
    else:
        new_scheduler = DDPMScheduler.from_config(config)
    copy = type(pipe)(unet=pipe.unet, scheduler=new_scheduler)
    copy.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return copy


def load_pipeline(model: str | os.PathLike, scheduler: Sampler = "ddpm") -> "DDPMPaperPipeline":
    """`DDPMPaperPipeline` from a folder, with its paper `DDPMScheduler` or a `DDIMScheduler` of the same
    training schedule: the one loader of evaluation, the demo, `ddpm sample` and `ddpm push`. The folder's
    configs are checked ([`check_pipeline_folder`]) before anything is built, and weights that are not all finite
    are refused, naming them."""
    from .pipelines.pipeline_ddpm_paper import DDPMPaperPipeline

    check_sampler(scheduler)
    if not os.path.isdir(model) or not os.path.isfile(os.path.join(model, "model_index.json")):
        hint = ""
        if os.path.isfile(os.path.join(model, ONNX_METADATA_FILE)):
            hint = " It is an ONNX export: sample it with the onnxruntime backend."
        raise FileNotFoundError(f"{model} is not a pipeline folder (no model_index.json).{hint}")
    check_pipeline_folder(model)
    pipe = DDPMPaperPipeline.from_pretrained(model)
    check_finite_weights(pipe.unet, model)
    pipe.set_progress_bar_config(leave=False)
    return pipe if scheduler == "ddpm" else with_scheduler(pipe, scheduler)


def check_finite_weights(unet: Any, model: str | os.PathLike) -> None:
    """`ValueError` naming the UNet weights of `model` that hold NaN or infinity (a diverged training run)."""
    import torch

    counts = [(name, int((~torch.isfinite(tensor)).sum())) for name, tensor in unet.state_dict().items()
              if tensor.is_floating_point()]
    bad = [(name, count) for name, count in counts if count]
    if bad:
        total = sum(count for _, count in bad)
        names = ", ".join(f"{name} ({count:,})" for name, count in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"{model}: the UNet holds {total:,} non-finite weights (NaN or infinity) in {len(bad)} "
                         f"tensors: {names}; it cannot be sampled (its training diverged).")


def sample_grid(pipe: "DDPMPaperPipeline", num_images: int, num_inference_steps: int, seed: int = 0,
                tile_pixels: int = 64) -> Image.Image:
    """A grid of `num_images` samples of `pipe` from a fresh generator seeded with `seed` (no global RNG is
    touched), each upscaled by nearest neighbour to at least `tile_pixels`: the picture of training logs and
    model cards."""
    import torch

    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    images = pipe(batch_size=num_images, num_inference_steps=num_inference_steps, generator=generator,
                  output_type="np").images
    return make_grid(images, scale=max(1, tile_pixels // images.shape[1]))


def default_backend(model: str | os.PathLike) -> Backend:
    """The backend when the engine table cannot decide (`export.engine_choice.choose_engine`): ONNX Runtime when
    the folder is an ONNX export or carries one in `onnx/` (as `ddpm export` writes it), else PyTorch."""
    folder = Path(model)
    exported = (folder / ONNX_METADATA_FILE).is_file() or (folder / ONNX_SUBFOLDER / ONNX_METADATA_FILE).is_file()
    return "onnxruntime" if exported else "pytorch"


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s noise stream: NumPy's `SeedSequence(seed, spawn_key=(index,))`, the
    independent child stream `index` of `seed`, reduced to the 63 bits both generators take."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"`seed` must be an integer in 0..{MAX_SEED}, got {seed!r}.")


class PerImageNoise:
    """NumPy noise with one stream per image: `standard_normal((B, ...))` stacks one draw of shape `(...)`
    from each image's stream (the noise-source interface `OnnxDDPMPipeline` takes as `generator`)."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [np.random.default_rng(seed) for seed in seeds]

    def standard_normal(self, shape: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} images asked of {len(self.generators)} image streams.")
        return np.stack([generator.standard_normal(shape[1:], dtype=dtype) for generator in self.generators])


@dataclass(frozen=True)
class LoadedFiles:
    """What a sampler loaded from its model folder."""

    model: Path  # the pipeline or export folder
    files: dict[str, str]  # every file the backend loads, relative to `model`, with its SHA-256
    schedule: dict[str, Any]  # the resolved training schedule ([`resolved_schedule`])


def loaded_files(model: str | os.PathLike, backend: Backend) -> LoadedFiles:
    """SHA-256 of every file `backend` may load from the pipeline folder `model`, by path relative to it, and the
    resolved schedule of its scheduler configuration: the pipeline's `model_index.json`, `scheduler/` and `unet/`
    for PyTorch; the export folder (the metadata, every graph and data file, its scheduler configuration) and
    `model_index.json` for ONNX Runtime. Regular files only: a link or a device is refused before anything is read."""
    model = Path(model)
    if backend in ONNX_BACKENDS:
        folders = [model if (model / ONNX_METADATA_FILE).is_file() else model / ONNX_SUBFOLDER]
    else:
        folders = [model / "scheduler", model / "unet"]
    paths = [regular_file(model, "model_index.json")] if (model / "model_index.json").exists() else []
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{model} holds no {folder.name}/ folder for the {backend} backend.")
        paths += list(regular_files(folder))
    files = {path.relative_to(model).as_posix() or path.name: file_sha256(path) for path in paths}
    configs = [name for name in files if name.endswith(SCHEDULER_CONFIG)]
    if not configs:
        raise FileNotFoundError(f"{model} holds no {SCHEDULER_CONFIG}.")
    scheduler_config = read_json(model / configs[0])
    check_schedule_size(scheduler_config, str(model / configs[0]))  # before the betas are built
    return LoadedFiles(model.resolve(), files, resolved_schedule(scheduler_config))


def resolved_schedule(scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a scheduler configuration that decide the images, with diffusers' defaults filled in, and the
    SHA-256 of the float64 betas they give."""
    betas = GaussianDiffusion.from_config(scheduler_config).betas
    return {
        "num_train_timesteps": int(betas.shape[0]),
        "betas_sha256": hashlib.sha256(np.ascontiguousarray(betas, dtype="<f8").tobytes()).hexdigest(),
        "variance_type": scheduler_config.get("variance_type", "fixed_small"),
        "clip_sample": scheduler_config.get("clip_sample", True),
        "clip_sample_range": scheduler_config.get("clip_sample_range", 1.0),
        "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
        "timestep_spacing": scheduler_config.get("timestep_spacing", "leading"),
        "steps_offset": scheduler_config.get("steps_offset", 0),
    }


class ImageSampler(Protocol):
    """Draws images start..start+count-1 of a run as uint8 NHWC, and says what it runs."""

    backend: Backend
    scheduler: Sampler
    num_inference_steps: int
    eta: float
    seed: int
    loaded: LoadedFiles | None  # the files it loaded (set by `ddpm_plugin.export.sampler.open_sampler`)
    image_shape: tuple[int, int, int]  # (channels, height, width)
    precision: str  # of the network it runs

    def __call__(self, start: int, count: int) -> np.ndarray: ...


@dataclass
class TorchImageSampler:
    """[`ImageSampler`] on a `DDPMPaperPipeline` (DDPM or DDIM, as its scheduler is), one torch generator per image."""

    pipe: "DDPMPaperPipeline"
    num_inference_steps: int
    seed: int
    scheduler: Sampler = "ddpm"
    eta: float = 0.0
    loaded: LoadedFiles | None = None
    backend: Backend = "pytorch"
    float32_below_t: int = 0  # with bf16 weights: the t below which the UNet's float32 copy runs

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.pipe.image_shape(1)[1:])

    @property
    def precision(self) -> str:
        """The dtype of the UNet's weights, with the t below which its float32 copy runs."""
        precision = {"float32": "fp32", "bfloat16": "bf16"}.get(str(self.pipe.unet.dtype).removeprefix("torch."))
        precision = precision or str(self.pipe.unet.dtype).removeprefix("torch.")
        below = self.float32_below_t
        return f"{precision}, float32 below t={below}" if below else precision

    def __call__(self, start: int, count: int) -> np.ndarray:
        import torch

        generators = [torch.Generator().manual_seed(image_seed(self.seed, i)) for i in range(start, start + count)]
        images = self.pipe(batch_size=count, num_inference_steps=self.num_inference_steps, generator=generators,
                           eta=self.eta, output_type="np", float32_below_t=self.float32_below_t).images
        return to_uint8(images)


@dataclass
class OnnxImageSampler:
    """[`ImageSampler`] on an `OnnxDDPMPipeline` (onnxruntime or OpenVINO), one NumPy stream per image."""

    pipe: Any  # export.onnx_pipeline.OnnxDDPMPipeline (imported lazily: it needs onnxruntime)
    num_inference_steps: int
    seed: int
    scheduler: Sampler = "ddpm"
    eta: float = 0.0
    loaded: LoadedFiles | None = None
    progress_bar: bool = True
    backend: Backend = "onnxruntime"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.pipe.image_shape

    @property
    def precision(self) -> str:
        """The export's precision, with the t below which an int8 export runs its float32 graph."""
        precision, below = self.pipe.precision, self.pipe.float32_below_t
        return f"{precision}, float32 below t={below}" if below else precision

    def __call__(self, start: int, count: int) -> np.ndarray:
        noise = PerImageNoise([image_seed(self.seed, i) for i in range(start, start + count)])
        images = self.pipe(count, self.num_inference_steps, scheduler=self.scheduler, eta=self.eta, generator=noise,
                           output_type="np", progress_bar=self.progress_bar).images
        return to_uint8(images)
