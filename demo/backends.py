"""The demo's engine, free of Gradio: the configured models, sampling them with ONNX Runtime, OpenVINO or PyTorch,
and the pictures the page shows. The backend offered first is the one `ddpm sample` would choose on this machine
(`ddpm_plugin.export.engine_choice`).

`demo/app.py` lays out the page and hands every request to [`DemoEngine`]; everything here is also callable
from Python and tested without a browser.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ddpm_plugin.images import SnapshotRecorder, evenly_spaced_steps, make_grid, snapshot_grid, to_uint8
from ddpm_plugin.export.engine_choice import choose_engine
from ddpm_plugin.export.sampler import open_sampler
from ddpm_plugin.sampling import with_scheduler
from ddpm_plugin.trust import check_no_links, file_sha256, read_json
from ddpm_plugin.vocabulary import (
    BACKENDS,
    ONNX_BACKENDS,
    ONNX_METADATA_FILE,
    ONNX_SUBFOLDER,
    PAPER_VARIANCE_TYPES,
    SAMPLERS,
    TRAINING_CONFIG_FILE,
    TRAINING_RUN_FILE,
)

logger = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1  # seeds are 0..MAX_SEED, the range every client's number widget can hold exactly
MAX_IMAGES = 16  # default cap on images per request: bounds the memory one request can take
CONCURRENCY_LIMIT = 2  # default number of requests sampled at once; the rest wait in the queue
QUEUE_SIZE = 64  # default number of requests that may wait; beyond that new ones are turned away with a message
NUM_SNAPSHOTS = 8  # columns of the denoising progression (paper Fig. 6)
PROGRESSION_IMAGES = 4  # images whose progression is drawn, two rows each (x_t and predicted x_0)
GALLERY_PIXELS = 128  # gallery images are upscaled to at least this size, by nearest neighbour
PROGRESSION_PIXELS = 64  # the same for each tile of the progression
MAX_LAMBDAS = 16  # most interpolation weights per request
MAX_ECHO = 60  # characters of a rejected value that a message repeats
# The interpolation step each model starts at, measured (benchmarks/interpolation_t.py, results in
# docs/results/interpolation_t.json): keyed by the SHA-256 of the UNet weights, with a fallback for other models.
INTERPOLATION_DEFAULTS = Path(__file__).resolve().parent / "interpolation_defaults.json"
WEIGHTS_FILE = "unet/diffusion_pytorch_model.safetensors"

BACKEND_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "pytorch": "PyTorch"}  # in messages and labels
# Called after every denoising step with (steps done, total steps).
StepCallback = Callable[[int, int], None]


def shown(value: Any) -> str:
    """`repr(value)`, shortened: a message never echoes a long value back."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO else f"{text[:MAX_ECHO]}... ({len(text):,} characters)"


def _integer_in(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in low..high, or a `ValueError` naming the control. Any type may come in (an API client
    sends what it likes): a bool, a string, NaN, infinity or a fraction is refused, never rounded."""
    whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not whole:
        raise ValueError(f"{name} must be a whole number in {low}..{high}, got {shown(value)}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {shown(int(value))}.")
    return int(value)


def _one_of(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {shown(value)}.")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """What the page (or an API client) asks for. [`DemoEngine.check`] validates it.

    Args:
        model (`str`): The name of a configured model (never a path).
        backend (`str`, defaults to `"onnxruntime"`): `"onnxruntime"`, `"openvino"` or `"pytorch"`.
        sampler (`str`, defaults to `"ddpm"`): `"ddpm"` (the paper's ancestral sampler), `"ddim"` or `"dpmsolver++"`.
        variance_type (`str`, defaults to `"fixed_large"`): sigma_t^2 of the ancestral sampler, beta_t
            (`"fixed_large"`) or beta_tilde_t (`"fixed_small"`); DDIM ignores it.
        num_inference_steps (`int`, defaults to 1000): Denoising steps, 1..`num_train_timesteps`.
        num_images (`int`, defaults to 4): Images to generate, 1..the engine's `max_images`.
        seed (`int`, defaults to 0): Seed of the initial noise and of every step's noise, 0..`MAX_SEED`.
        eta (`float`, defaults to 0.0): DDIM's stochasticity in 0..1; the ancestral sampler and DPM-Solver++ ignore it.
    """

    model: str
    backend: str = "onnxruntime"
    sampler: str = "ddpm"
    variance_type: str = "fixed_large"
    num_inference_steps: int = 1000
    num_images: int = 4
    seed: int = 0
    eta: float = 0.0


@dataclass
class Generation:
    """The result of one request.

    Args:
        images (`np.ndarray` of shape `(num_images, height, width, channels)`): The samples x_0 in [0, 1].
        x_t (`np.ndarray` of shape `(num_snapshots, num_images, height, width, channels)`): x_t at the snapshot
            steps, in [0, 1].
        pred_original_sample (`np.ndarray` of the shape of `x_t`): The predicted x_0 at the same steps.
        timesteps (`list[int]`): t of each snapshot.
        seconds (`float`): Sampling time.
    """

    images: np.ndarray
    x_t: np.ndarray
    pred_original_sample: np.ndarray
    timesteps: list[int]
    seconds: float


class ProgressionRecorder(SnapshotRecorder):
    """The step callback of both backends: keeps x_t and the predicted x_0 at `NUM_SNAPSHOTS` evenly spaced
    steps, first and last included, and reports progress."""

    def __init__(self, num_inference_steps: int, on_step: StepCallback | None = None) -> None:
        super().__init__(evenly_spaced_steps(num_inference_steps, NUM_SNAPSHOTS))
        self.num_inference_steps = num_inference_steps
        self.on_step = on_step

    def __call__(self, i: int, t: int, x_t: np.ndarray, pred_original_sample: np.ndarray) -> None:
        super().__call__(i, t, x_t, pred_original_sample)
        if self.on_step is not None:
            self.on_step(i + 1, self.num_inference_steps)

    def result(self, images: np.ndarray, seconds: float) -> Generation:
        x_t, pred_original_sample = self.stacked()
        return Generation(images=np.asarray(images, dtype=np.float32), x_t=x_t,
                          pred_original_sample=pred_original_sample, timesteps=self.timesteps, seconds=seconds)


class DemoModel:
    """One configured pipeline folder, loaded for PyTorch and, when possible, for ONNX Runtime and OpenVINO (its
    export).

    Args:
        name (`str`): The name the page shows.
        folder (`Path`): The pipeline folder (`model_index.json`, `unet/`, `scheduler/`, optionally `onnx/`); a
            link or special file anywhere in it is refused (`UntrustedInputError`) before anything is read.
        num_threads (`int`, *optional*): Intra-op threads of each ONNX Runtime session.
        onnx (`bool`, defaults to `True`): Load the ONNX network of `folder/onnx` (as `ddpm export` writes it).
        concurrency (`int`, defaults to 1): Requests that may sample at once: one export pipeline each per engine,
            because a pipeline's bound input and output buffers belong to one request at a time.
    """

    def __init__(
        self, name: str, folder: Path, num_threads: int | None = None, onnx: bool = True, concurrency: int = 1
    ):
        check_no_links(folder)  # before anything reads it: a link or a device would be followed or read forever
        self.name, self.folder = name, folder
        self.torch_pipeline = open_sampler(folder, "pytorch", progress_bar=False).pipe
        config = self.torch_pipeline.scheduler.config
        self.num_train_timesteps = int(config.num_train_timesteps)
        self.variance_type = config.variance_type
        self.image_shape = tuple(self.torch_pipeline.image_shape(1)[1:])  # (channels, height, width)
        self.interpolation_t, self.interpolation_hint = interpolation_default(folder, self.num_train_timesteps)
        self._export_pipelines: dict[str, queue.SimpleQueue] = {}
        self.onnx_folder: Path | None = None  # the export the export backends sample with
        # Why an export backend is off, by backend (None: available); visitors see it (the page, `/models`).
        self.export_problems: dict[str, str | None] = {backend: "disabled by --no-onnx" for backend in ONNX_BACKENDS}
        self.export_precisions: dict[str, str] = {}  # the precision each export backend runs, once loaded
        for backend in ONNX_BACKENDS if onnx else ():
            try:
                self._export_pipelines[backend] = self._load_export(backend, num_threads, concurrency)
                self.export_problems[backend] = None
            except Exception as error:  # an optional backend: the page explains why it is off
                logger.warning("%s backend disabled for %s: %s: %s", BACKEND_NAMES[backend], name,
                               type(error).__name__, error)
                # The model's name stands for its server path.
                self.export_problems[backend] = f"{type(error).__name__}: {error}".replace(str(folder), name)

    @property
    def onnx_problem(self) -> str | None:
        """Why ONNX Runtime is off for this model (None: it is available)."""
        return self.export_problems["onnxruntime"]

    @property
    def has_onnx(self) -> bool:
        return "onnxruntime" in self._export_pipelines

    def runs(self, backend: str) -> bool:
        return backend == "pytorch" or backend in self._export_pipelines

    def _load_export(self, backend: str, num_threads: int | None, concurrency: int) -> queue.SimpleQueue:
        if not (self.folder / ONNX_SUBFOLDER / ONNX_METADATA_FILE).is_file():
            raise FileNotFoundError(f"{self.folder} carries no ONNX export in {ONNX_SUBFOLDER}/: "
                                    f"run `ddpm export --model {self.folder} --output {self.folder}/onnx` to add one")
        if importlib.util.find_spec(backend) is None:
            raise ModuleNotFoundError(f'{backend} is not installed: pip install "ddpm-plugin[{backend}]"')
        options: dict[str, Any] = {"device": "auto"}
        if backend == "openvino":  # the precision `ddpm sample` would choose for OpenVINO at the default request
            choice = choose_engine(self.folder, GenerationRequest.num_images, backend="openvino")
            options = {"precision": choice.precision}
        pipelines: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(concurrency):
            sampler = open_sampler(self.folder, backend, num_threads=num_threads, progress_bar=False, **options)
            pipelines.put(sampler.pipe)
        self.export_precisions[backend] = sampler.precision
        self.onnx_folder = self.folder / ONNX_SUBFOLDER
        return pipelines

    @contextmanager
    def _export_pipeline(self, backend: str) -> Iterator[Any]:
        pipelines = self._export_pipelines[backend]
        pipe = pipelines.get()
        try:
            yield pipe
        finally:
            pipelines.put(pipe)

    def sample(self, request: GenerationRequest, recorder: ProgressionRecorder) -> np.ndarray:
        """Run `request` (already checked) on its backend, feeding `recorder`; the images NHWC in [0, 1]."""
        if request.backend in ONNX_BACKENDS:
            with self._export_pipeline(request.backend) as pipe:
                return pipe(
                    batch_size=request.num_images, num_inference_steps=request.num_inference_steps,
                    scheduler=request.sampler, eta=request.eta, variance_type=request.variance_type,
                    seed=request.seed, output_type="np", callback=recorder, progress_bar=False,
                ).images
        return self._sample_torch(request, recorder)

    def _sample_torch(self, request: GenerationRequest, recorder: ProgressionRecorder) -> np.ndarray:
        import torch

        pipe = with_scheduler(self.torch_pipeline, request.sampler, request.variance_type)
        pipe.set_progress_bar_config(disable=True)

        def on_step_end(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
            recorder(i, int(t), tensors["latents"].float().numpy(), tensors["pred_original_sample"].float().numpy())
            return {}

        return pipe(
            batch_size=request.num_images, generator=torch.Generator().manual_seed(request.seed),
            num_inference_steps=request.num_inference_steps, output_type="np", eta=request.eta,
            callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
        ).images

    def interpolate(self, image_a: np.ndarray, image_b: np.ndarray, timestep: int, num_lambdas: int, seed: int) -> Any:
        """Paper Fig. 8-9 on PyTorch: [`DDPMPaperPipeline.interpolate`] of two uint8 images at `timestep`."""
        import torch

        return with_scheduler(self.torch_pipeline, "ddpm").interpolate(
            image_a, image_b, timestep=timestep, lambdas=np.linspace(0.0, 1.0, num_lambdas),
            generator=torch.Generator().manual_seed(seed),
        )

    def bits_per_dim(self, image: np.ndarray, seed: int) -> Any:
        """The variational bound of one uint8 image, [`DDPMPaperPipeline.bits_per_dim`] on PyTorch."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        return with_scheduler(self.torch_pipeline, "ddpm").bits_per_dim(image[None], generator=generator)


def interpolation_default(folder: Path, num_train_timesteps: int) -> tuple[int, str]:
    """The interpolation step t the page starts at for the model in `folder`, and a sentence that says why: the
    deepest t at which the measured model's reconstructions kept their class, else the table's fallback."""
    table = read_json(INTERPOLATION_DEFAULTS)
    weights = folder / WEIGHTS_FILE
    entry = table.get(file_sha256(weights)) if weights.is_file() else None
    if entry is None:
        timestep = min(table["fallback"]["timestep"], num_train_timesteps - 1)
        return timestep, (f"Starts at t = {timestep}: this model was not measured, so it takes the shallowest default of "
                          "the measured models. A larger t mixes more but may lose what the two images are.")
    timestep = min(entry["timestep"], num_train_timesteps - 1)
    return timestep, (f"Starts at t = {timestep}: measured on this model, reconstructions keep their class up to "
                      f"t = {timestep} ({entry['class_kept']:.0%} of the digits tried) and lose it deeper. A larger t "
                      "mixes more; a smaller one stays closer to the two images.")


DATASET_NAMES = {"mnist": "MNIST", "digits": "scikit-learn's 8x8 digits"}


def training_summary(folder: Path) -> str:
    """What the model in `folder` was trained on, for how long, and what was measured, as one Markdown line;
    empty where the folder does not say (any pipeline folder may be shown, not only the bundled ones)."""
    try:
        config = json.loads((folder / TRAINING_CONFIG_FILE).read_text())
        run = json.loads((folder / TRAINING_RUN_FILE).read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(config, dict) or not isinstance(run, dict) or not isinstance(run.get("step"), int):
        return ""
    dataset = DATASET_NAMES.get(config.get("dataset"), str(config.get("dataset", "an unnamed data set")))
    text = f"Trained on {dataset} for {run['step']:,} steps"
    if isinstance(run.get("images_seen"), int):
        text += f" ({run['images_seen']:,} images)"
    if isinstance(run.get("wall_minutes"), (int, float)):
        text += f" in {run['wall_minutes'] / 60:.1f} hours on one CPU thread"
    measured = run.get("measured")
    if isinstance(measured, dict) and measured:
        text += ". Measured: " + "; ".join(f"{name} {value}" for name, value in measured.items())
    return text + "."


def unique_names(folders: Sequence[Path]) -> list[str]:
    """The folders' base names, with `-2`, `-3`, ... added where two folders share a name."""
    names: list[str] = []
    for folder in folders:
        name, k = folder.name or "model", 2
        while name in names:
            name, k = f"{folder.name}-{k}", k + 1
        names.append(name)
    return names


class DemoEngine:
    """The configured models and the limits the page enforces.

    Args:
        folders (`Sequence[str | os.PathLike]`): Pipeline folders; the page offers them by base name only.
        max_images (`int`, defaults to `MAX_IMAGES`): Most images one request may ask for.
        num_threads (`int`, *optional*): Threads per request for PyTorch and ONNX Runtime.
        onnx (`bool`, defaults to `True`): Offer the ONNX Runtime backend for the models that carry `onnx/`.
        concurrency (`int`, defaults to 1): Requests that may run at once (the page's queue admits as many).

    Example:

    ```py
    >>> from ddpm_plugin.bundled import resolve_model
    >>> from ddpm_plugin.demo.backends import DemoEngine, GenerationRequest
    >>> engine = DemoEngine([resolve_model(None)])
    >>> generation = engine.generate(GenerationRequest("ddpm-digits", sampler="ddim", num_inference_steps=50))
    >>> generation.images.shape
    (4, 8, 8, 1)
    ```
    """

    def __init__(
        self,
        folders: Sequence[str | os.PathLike],
        max_images: int = MAX_IMAGES,
        num_threads: int | None = None,
        onnx: bool = True,
        concurrency: int = 1,
    ):
        if not folders:
            raise ValueError("`folders` must name at least one pipeline folder.")
        if max_images < 1:
            raise ValueError(f"`max_images` must be at least 1, got {max_images}.")
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        paths = [Path(folder).resolve() for folder in folders]
        self.models = {
            name: DemoModel(name, path, num_threads=num_threads, onnx=onnx, concurrency=concurrency)
            for name, path in zip(unique_names(paths), paths)
        }
        self.max_images = max_images

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    @property
    def backends(self) -> list[str]:
        """The backends at least one model can run; first the one `ddpm sample` would choose here for the first
        model's default request, where that one runs."""
        available = [backend for backend in BACKENDS if any(model.runs(backend) for model in self.models.values())]
        first = self.models[self.model_names[0]]
        chosen = choose_engine(first.folder, GenerationRequest.num_images).backend
        return sorted(available, key=lambda backend: backend != chosen) if first.runs(chosen) else available

    @property
    def max_steps(self) -> int:
        return max(model.num_train_timesteps for model in self.models.values())

    def model(self, name: str) -> DemoModel:
        """The configured model called `name`; nothing else (no paths) can be chosen."""
        if not isinstance(name, str) or name not in self.models:
            raise ValueError(f"Unknown model {shown(name)}; choose one of: {', '.join(self.models)}.")
        return self.models[name]

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with whole numbers as ints, or a `ValueError` that names the rejected control."""
        model = self.model(request.model)
        _one_of("Backend", request.backend, BACKENDS)
        if not model.runs(request.backend):
            raise ValueError(f"{BACKEND_NAMES[request.backend]} is not available for {model.name} "
                             f"({model.export_problems[request.backend]}); use PyTorch.")
        _one_of("Sampler", request.sampler, SAMPLERS)
        _one_of("Variance", request.variance_type, PAPER_VARIANCE_TYPES)
        eta = request.eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"Eta must be a number in 0..1, got {shown(eta)}.")
        return GenerationRequest(
            model=request.model, backend=request.backend, sampler=request.sampler,
            variance_type=request.variance_type,
            num_inference_steps=_integer_in("Steps", request.num_inference_steps, 1, model.num_train_timesteps),
            num_images=_integer_in("Number of images", request.num_images, 1, self.max_images),
            seed=_integer_in("Seed", request.seed, 0, MAX_SEED), eta=float(eta),
        )

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> Generation:
        """Check and run `request`, calling `on_step(done, total)` after every denoising step."""
        request = self.check(request)
        recorder = ProgressionRecorder(request.num_inference_steps, on_step)
        start = time.perf_counter()
        images = self.models[request.model].sample(request, recorder)
        return recorder.result(images, time.perf_counter() - start)

    def interpolate(
        self, model: str, image_a: np.ndarray | None, image_b: np.ndarray | None, timestep: Any, num_lambdas: Any,
        seed: Any,
    ) -> tuple[np.ndarray, Any]:
        """Paper Fig. 8-9: the two uploads fitted to the model, and the decoded interpolants at `timestep`."""
        demo_model = self.model(model)
        timestep = _integer_in("Interpolation step t", timestep, 0, demo_model.num_train_timesteps - 1)
        num_lambdas = _integer_in("Number of interpolants", num_lambdas, 2, MAX_LAMBDAS)
        seed = _integer_in("Seed", seed, 0, MAX_SEED)
        images = np.stack([fit_image(name, image, demo_model.image_shape)
                           for name, image in (("Image A", image_a), ("Image B", image_b))])
        return images, demo_model.interpolate(images[0], images[1], timestep, num_lambdas, seed)

    def bits_per_dim(self, model: str, image: np.ndarray | None, seed: Any) -> tuple[np.ndarray, Any]:
        """The upload fitted to the model, and its variational bound in bits/dim with the breakdown."""
        demo_model = self.model(model)
        seed = _integer_in("Seed", seed, 0, MAX_SEED)
        fitted = fit_image("Image", image, demo_model.image_shape)
        return fitted, demo_model.bits_per_dim(fitted, seed)

    def describe(self) -> dict[str, Any]:
        """The models, backends and limits, as the `/models` API returns them."""
        return {
            "models": {
                name: {
                    "image_shape": list(model.image_shape),
                    "num_train_timesteps": model.num_train_timesteps,
                    "variance_type": model.variance_type,
                    "interpolation_t": model.interpolation_t,
                    **{backend: model.export_problems[backend] or "available" for backend in ONNX_BACKENDS},
                    "training": training_summary(model.folder),
                }
                for name, model in self.models.items()
            },
            "backends": self.backends,
            "samplers": list(SAMPLERS),
            "variance_types": list(PAPER_VARIANCE_TYPES),
            "limits": {
                "max_images": self.max_images, "max_steps": self.max_steps, "max_seed": MAX_SEED,
                "max_lambdas": MAX_LAMBDAS,
            },
            "defaults": asdict(GenerationRequest(self.model_names[0], backend=self.backends[0])),
        }


def fit_image(name: str, image: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    """An uploaded picture as the model's uint8 (height, width, channels) input: gray or RGB as the model
    takes, resized with a box filter (the average of the pixels each model pixel covers)."""
    if image is None:
        raise ValueError(f"{name}: upload an image first.")
    channels, height, width = shape
    array = to_uint8(np.asarray(image))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    picture = Image.fromarray(array).convert("L" if channels == 1 else "RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.BOX)
    fitted = np.array(picture)  # writable: torch refuses read-only arrays
    return fitted[..., None] if channels == 1 else fitted


def display_scale(size: int, pixels: int) -> int:
    """The whole factor that brings `size` pixels to at least `pixels` (Gradio would smooth a small image)."""
    return max(1, math.ceil(pixels / size))


def gallery_images(images: np.ndarray) -> list[Image.Image]:
    """Each image upscaled by nearest neighbour so its pixels stay crisp in the gallery."""
    scale = display_scale(images.shape[1], GALLERY_PIXELS)
    return [make_grid(image[None], padding=0, scale=scale) for image in images]


def progression_picture(generation: Generation) -> Image.Image:
    """The denoising progression (paper Fig. 6): for each of the first `PROGRESSION_IMAGES` images a row of
    x_t and a row of the predicted x_0, one column per snapshot from t = T (left) to t = 0 (right)."""
    scale = display_scale(generation.x_t.shape[2], PROGRESSION_PIXELS)
    return snapshot_grid(generation.x_t, generation.pred_original_sample, scale=scale, max_images=PROGRESSION_IMAGES)


def interpolation_picture(images: np.ndarray, interpolants: np.ndarray) -> Image.Image:
    """One row: image A, the decoded interpolants from lambda = 0 to 1, image B (paper Fig. 8)."""
    row = np.concatenate([images[:1] / 255.0, interpolants, images[1:] / 255.0]).astype(np.float32)
    return make_grid(row, nrow=len(row), scale=display_scale(row.shape[1], PROGRESSION_PIXELS))
