"""`OnnxDDPMPipeline`: the DDPM sampler (Ho et al. 2020, Algorithm 2) and DDIM on ONNX Runtime, without PyTorch.

It loads the folder [`export_onnx`] writes (`model.onnx`, `scheduler/scheduler_config.json`, `ddpm_onnx.json`;
see `ddpm_plugin.export.onnx_export`) and runs the denoising loop in NumPy with the float64 coefficients of
[`GaussianDiffusion`]. Given the same initial noise and per-step noise it reproduces `DDPMPaperPipeline` with
diffusers' `DDPMScheduler` (any `num_inference_steps`) or `DDIMScheduler.from_config(...)` (any `eta`).

This module imports only the standard library, NumPy, onnxruntime, Pillow, tqdm and torch-free modules of
ddpm-plugin, so it works where `import torch` fails.

Speed: the UNet's input, timestep and output live in buffers bound once per batch size (IO binding), so a
step costs one `run_with_iobinding` and a few NumPy operations on the sample, with nothing re-bound. On CPU
the bound buffers are the NumPy arrays themselves (shared memory); on CUDA they are device buffers at fixed
addresses, which is what ORT's CUDA graphs need (`cuda_graph=True`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from ddpm_plugin.images import SnapshotRecorder, every_k_steps, to_image, to_pil_images
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.vocabulary import (
    ONNX_FLOAT32_MODEL_FILE,
    ONNX_METADATA_FILE,
    ONNX_MODEL_FILE,
    ONNX_SUBFOLDER,
    SCHEDULER_CONFIG,
    Sampler,
    VarianceType,
    check_sampler,
    check_steps,
)

from .freshness import check_export_fresh
from .providers import CUDA, ProviderSpec, resolve_providers, session_options

FORMAT_VERSION = 1
MAX_BOUND_BATCH_SIZES = 8  # buffers kept bound for this many batch sizes
# `key: "location"` of an ONNX external data entry, as protobuf writes it (field 1, length 8), then the tag of
# its value (field 2, length-delimited).
EXTERNAL_LOCATION = b"\x0a\x08location\x12"
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], None]


class OnnxModelError(RuntimeError):
    """The ONNX folder or model cannot be used; the message says which file and why."""


@dataclass
class OnnxPipelineOutput:
    """Output of [`OnnxDDPMPipeline.__call__`].

    Args:
        images (`np.ndarray` of shape `(batch_size, height, width, channels)` in [0, 1], or `list[PIL.Image]`):
            The samples x_0.
    """

    images: Any


@dataclass
class OnnxProgressiveOutput:
    """Output of [`OnnxDDPMPipeline.progressive_generation`] (paper Fig. 6); the fields of
    `ddpm_plugin.ProgressiveGenerationOutput`.

    Args:
        images (`np.ndarray` `(batch_size, height, width, channels)`): The final samples in [0, 1].
        x_t (`np.ndarray` `(num_snapshots, batch_size, height, width, channels)`): x_t at each snapshot, in [0, 1].
        pred_original_sample (`np.ndarray`, same shape as `x_t`): The predicted x_0 at each snapshot, in [0, 1].
        timesteps (`list[int]`): The timestep t of each snapshot.
    """

    images: np.ndarray
    x_t: np.ndarray
    pred_original_sample: np.ndarray
    timesteps: list[int]


# --- Timesteps and the respaced schedule, as diffusers' schedulers compute them. ---


def inference_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray:
    """The descending timesteps `DDPMScheduler.set_timesteps` / `DDIMScheduler.set_timesteps` choose for
    `num_inference_steps` under the config's `timestep_spacing` and `steps_offset`."""
    num_train_timesteps = config.get("num_train_timesteps", 1000)
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
        return timesteps + config.get("steps_offset", 0)
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_inference_steps
        return np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    raise ValueError(f"`timestep_spacing` must be 'linspace', 'leading' or 'trailing', got {spacing!r}.")


def respace(diffusion: GaussianDiffusion, timesteps: np.ndarray) -> GaussianDiffusion:
    """The diffusion process restricted to `timesteps` (descending): its step k goes from t_k to the next
    kept timestep, with beta'_k = 1 - alpha_bar_{t_k} / alpha_bar_{t_{k-1}} (Nichol & Dhariwal 2021, App. B).

    Its posterior coefficients are exactly the ones `DDPMScheduler.step` forms from `alphas_cumprod[t]` and
    `alphas_cumprod[prev_t]` when `num_inference_steps` < T. Index k of the result is the k-th smallest kept
    timestep. With every timestep kept, `diffusion` itself is returned.
    """
    ascending = np.asarray(timesteps, dtype=np.int64)[::-1]
    if np.array_equal(ascending, np.arange(diffusion.num_timesteps)):
        return diffusion
    alphas_cumprod = diffusion.alphas_cumprod[ascending]
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion.from_betas(1.0 - alphas_cumprod / alphas_cumprod_prev)


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """sigma_t(eta) of Song et al. (2021), Eq. 16: eta sqrt((1 - a_prev)/(1 - a_t) (1 - a_t / a_prev))."""
    return eta * float(np.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)))


# --- The UNet with pre-bound buffers. ---


class BoundUNet:
    """eps_theta(x_t, t) for one batch size, with input and output bound once (IO binding).

    `sample` (float32 NCHW) and `timestep` (int64) are host arrays the caller writes into; `__call__` returns
    the host array holding eps. On CPU these arrays *are* the bound buffers; on CUDA the bound buffers are
    device tensors at fixed addresses (CUDA-graph friendly), updated in place from the host arrays.

    With a `float32_session` (an int8 export's float32 graph) the same buffers are bound to it too, and it runs
    for t < `float32_below_t` (time-step-aware precision).
    """

    def __init__(
        self, session: ort.InferenceSession, shape: tuple[int, ...], device: str, graph_id: int | None = None,
        float32_session: ort.InferenceSession | None = None, float32_below_t: int = 0,
    ) -> None:
        self.sample = np.zeros(shape, dtype=np.float32)
        self.timestep = np.zeros(shape[:1], dtype=np.int64)
        self.noise_pred = np.zeros(shape, dtype=np.float32)
        self.device = device
        self.float32_below_t = float32_below_t if float32_session is not None else 0
        # No RunOptions unless needed: onnxruntime looks up `gpu_graph_id` in them on every run, and a missing
        # entry costs a C++ exception (~0.2 ms, a quarter of a digits step).
        self.run_options = None
        if graph_id is not None:  # one captured CUDA graph per batch size (and session)
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        if device == "cpu":
            # OrtValues over NumPy memory: ORT reads `sample` and writes `noise_pred` in place.
            self._values = [ort.OrtValue.ortvalue_from_numpy(array) for array in (self.sample, self.timestep, self.noise_pred)]
        else:
            self._values = [ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for array in (self.sample, self.timestep, self.noise_pred)]
        self._runs = [self._bind(session)]
        if self.float32_below_t:
            self._runs.append(self._bind(float32_session))

    def _bind(self, session: ort.InferenceSession) -> tuple[ort.InferenceSession, Any]:
        binding = session.io_binding()
        input_name, timestep_name = (value.name for value in session.get_inputs())
        binding.bind_ortvalue_input(input_name, self._values[0])
        binding.bind_ortvalue_input(timestep_name, self._values[1])
        binding.bind_ortvalue_output(session.get_outputs()[0].name, self._values[2])
        return session, binding

    def __call__(self, t: int) -> np.ndarray:
        self.timestep.fill(t)
        session, binding = self._runs[t < self.float32_below_t]
        if self.device == "cpu":
            session.run_with_iobinding(binding, self.run_options)
            return self.noise_pred
        self._values[0].update_inplace(self.sample)
        self._values[1].update_inplace(self.timestep)
        session.run_with_iobinding(binding, self.run_options)
        return self._values[2].numpy()


# --- The pipeline. ---


class OnnxDDPMPipeline:
    r"""
    Unconditional image generation with a DDPM UNet exported to ONNX, on ONNX Runtime, without PyTorch.

    Parameters:
        session (`onnxruntime.InferenceSession`):
            The UNet: inputs `sample` float32 `[B, C, H, W]` and `timestep` int64 `[B]`, output eps.
        scheduler_config (`dict`):
            The pipeline's `DDPMScheduler` configuration (the training schedule and `variance_type`).
        metadata (`dict`):
            The contents of `ddpm_onnx.json`.
        cuda_graph (`bool`, *optional*, defaults to `False`):
            Whether the session was created with ORT CUDA graphs (one graph is captured per batch size).
        float32_session (`onnxruntime.InferenceSession`, *optional*):
            An int8 export's float32 graph, run for t < `metadata["float32_below_t"]` (time-step-aware precision).

    One call at a time per instance: the bound buffers are shared between calls (the demo keeps one instance
    per concurrent request).
    """

    def __init__(
        self, session: ort.InferenceSession, scheduler_config: dict[str, Any], metadata: dict[str, Any],
        cuda_graph: bool = False, float32_session: ort.InferenceSession | None = None,
    ) -> None:
        self.session = session
        self.float32_session = float32_session
        self.float32_below_t = int(metadata.get("float32_below_t") or 0) if float32_session is not None else 0
        self.scheduler_config = dict(scheduler_config)
        self.metadata = dict(metadata)
        self.diffusion = GaussianDiffusion.from_config(self.scheduler_config)
        self.device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        self.cuda_graph = cuda_graph
        self._bound: dict[int, BoundUNet] = {}
        for model in (session, float32_session):
            if model is not None:
                self._check_model_interface(model)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.metadata["sample_size"]
        return (self.metadata["in_channels"], size, size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        provider: ProviderSpec = "auto",
        num_threads: int | None = None,
        cuda_graph: bool = False,
    ) -> "OnnxDDPMPipeline":
        r"""
        Load an export folder (or a pipeline folder with its export in `onnx/`).

        Args:
            path (`str` or `os.PathLike`):
                The folder `ddpm export` wrote, or a pipeline folder holding it in an `onnx/` sub-folder.
            provider (`str` or `list`, *optional*, defaults to `"auto"`):
                `"auto"` (CUDA when a usable CUDA runtime is present, else CPU, quietly), `"cpu"`, `"cuda"`, or
                an explicit onnxruntime provider list such as `["CPUExecutionProvider"]`.
            num_threads (`int`, *optional*):
                Intra-op threads on CPU; defaults to the number of physical cores.
            cuda_graph (`bool`, *optional*, defaults to `False`):
                Capture and replay the UNet as an ORT CUDA graph (CUDA only).

        An int8 export with `float32_below_t` in its metadata loads its float32 graph as well and runs it for
        t < `float32_below_t` (`ddpm_plugin.export.quantize`).

        Raises:
            `FileNotFoundError`: a file of the folder is missing.
            [`OnnxModelError`]: the model is truncated or corrupt, does not fit the metadata, or uses an opset
            this onnxruntime cannot run.
            [`StaleExportError`]: the export sits in a pipeline folder whose weights changed since it was made.
        """
        folder = resolve_export_folder(path)
        metadata = _read_json(folder / ONNX_METADATA_FILE)
        if metadata.get("format_version") != FORMAT_VERSION:
            raise OnnxModelError(
                f"{folder / ONNX_METADATA_FILE} has format_version {metadata.get('format_version')!r}; this "
                f"ddpm-plugin reads version {FORMAT_VERSION}. Re-export with `ddpm export`."
            )
        check_export_fresh(folder, metadata)
        scheduler_config = _read_json(folder / SCHEDULER_CONFIG)
        model_path = model_file_in(folder, metadata.get("model_file", ONNX_MODEL_FILE))
        float32_below_t = metadata.get("float32_below_t", 0)
        if isinstance(float32_below_t, bool) or not isinstance(float32_below_t, int) or float32_below_t < 0:
            raise OnnxModelError(f"{folder / ONNX_METADATA_FILE}: `float32_below_t` must be an integer >= 0, got {float32_below_t!r}.")
        float32_path = None
        if float32_below_t:  # an int8 export that runs its float32 graph for small t
            float32_path = model_file_in(folder, metadata.get("float32_model_file", ONNX_FLOAT32_MODEL_FILE))
        for file in filter(None, (model_path, float32_path)):
            if not file.is_file():
                raise FileNotFoundError(f"the ONNX model {file} is missing; re-export with `ddpm export`.")
            check_external_data(file, folder)
        providers = resolve_providers(provider)
        names = [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in providers]
        if cuda_graph:
            if CUDA not in names:
                raise ValueError("`cuda_graph=True` needs the CUDA execution provider.")
            providers = [(CUDA, {"enable_cuda_graph": "1"}) if name == CUDA else name for name in names]
        session = _load_session(model_path, metadata, num_threads, providers)
        float32_session = None if float32_path is None else _load_session(float32_path, metadata, num_threads, providers)
        return cls(session, scheduler_config, metadata, cuda_graph=cuda_graph, float32_session=float32_session)

    def _check_model_interface(self, session: ort.InferenceSession) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 2 or len(outputs) != 1:
            raise OnnxModelError(
                f"the ONNX model must take (sample, timestep) and return eps; it has inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}."
            )
        sample, timestep = inputs
        expected = list(self.image_shape)
        if list(sample.shape[1:]) != expected or sample.type != "tensor(float)":
            raise OnnxModelError(
                f"the ONNX model's input {sample.name!r} is {sample.type} {sample.shape}, but ddpm_onnx.json describes "
                f"float [batch, {', '.join(map(str, expected))}] images; the model and its metadata do not belong together."
            )
        if timestep.type != "tensor(int64)":
            raise OnnxModelError(f"the ONNX model's input {timestep.name!r} must be int64, got {timestep.type}.")

    # --- Sampling. ---

    def check_inputs(
        self, batch_size: int, num_inference_steps: int, scheduler: str, eta: float, variance_type: str,
        latents: np.ndarray | None, output_type: str,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        check_steps(num_inference_steps, self.diffusion.num_timesteps)
        check_sampler(scheduler)
        if not eta >= 0.0:
            raise ValueError(f"`eta` must be >= 0, got {eta!r}.")
        if variance_type not in get_args(VarianceType):
            raise ValueError(f"`variance_type` must be one of {list(get_args(VarianceType))}, got {variance_type!r}.")
        expected = (batch_size, *self.image_shape)
        if latents is not None and tuple(np.shape(latents)) != expected:
            raise ValueError(f"`latents` must have shape {expected}, got {tuple(np.shape(latents))}.")
        if output_type not in ("np", "pil"):
            raise ValueError(f"`output_type` must be 'np' or 'pil', got {output_type!r}.")

    def bound_unet(self, batch_size: int) -> BoundUNet:
        """The UNet with buffers bound for `batch_size` (created once per batch size, then reused)."""
        if batch_size not in self._bound:
            if len(self._bound) >= MAX_BOUND_BATCH_SIZES and not self.cuda_graph:
                self._bound.pop(next(iter(self._bound)))  # forget the oldest batch size's buffers
            graph_id = len(self._bound) + 1 if self.cuda_graph else None
            self._bound[batch_size] = BoundUNet(
                self.session, (batch_size, *self.image_shape), self.device, graph_id,
                float32_session=self.float32_session, float32_below_t=self.float32_below_t,
            )
        return self._bound[batch_size]

    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1000,
        scheduler: Sampler = "ddpm",
        eta: float = 0.0,
        variance_type: str | None = None,
        seed: int | None = None,
        generator: np.random.Generator | None = None,
        latents: np.ndarray | None = None,
        output_type: Literal["np", "pil"] = "np",
        callback: StepCallback | None = None,
        progress_bar: bool = True,
    ) -> OnnxPipelineOutput:
        r"""
        Generate images from x_T ~ N(0, I) down to x_0.

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                The number of images.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                Denoising steps, 1..T; fewer steps use the timesteps and respaced posterior diffusers uses.
            scheduler (`str`, *optional*, defaults to `"ddpm"`):
                `"ddpm"` (ancestral sampling, Algorithm 2, as `DDPMScheduler`) or `"ddim"` (Song et al. 2021, as
                `DDIMScheduler.from_config` of the same configuration).
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's stochasticity (0: deterministic, 1: DDPM-like); ignored by `"ddpm"`.
            variance_type (`str`, *optional*):
                sigma_t^2 of `"ddpm"`: `"fixed_large"` (beta_t) or `"fixed_small"` (beta_tilde_t); defaults to
                the scheduler configuration's.
            seed (`int`, *optional*):
                Seed of a fresh `np.random.default_rng` for the initial and per-step noise.
            generator (`np.random.Generator`, *optional*):
                The noise source (its `standard_normal(shape, dtype=np.float32)` is called); overrides `seed`.
            latents (`np.ndarray` of shape `(batch_size, channels, height, width)`, *optional*):
                The starting noise x_T; drawn from the generator when not given.
            output_type (`str`, *optional*, defaults to `"np"`):
                `"np"` (NHWC float32 in [0, 1]) or `"pil"` (a list of `PIL.Image`).
            callback (`Callable`, *optional*):
                Called after every step as `callback(i, t, x_prev, pred_original_sample)` with float32 NCHW
                copies of the new sample x_{t-1} and the predicted x_0 (both in [-1, 1] model space).
            progress_bar (`bool`, *optional*, defaults to `True`):
                Show a tqdm progress bar.

        Example:

        ```py
        >>> from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
        >>> pipe = OnnxDDPMPipeline.from_pretrained("ddpm-digits/onnx")
        >>> images = pipe(batch_size=4, seed=0, num_inference_steps=100).images  # (4, 8, 8, 1) in [0, 1]
        ```

        Returns:
            [`OnnxPipelineOutput`]: `images` as an NHWC array or a list of PIL images.
        """
        variance_type = variance_type or self.scheduler_config.get("variance_type", "fixed_small")
        self.check_inputs(batch_size, num_inference_steps, scheduler, eta, variance_type, latents, output_type)
        if generator is None:
            generator = np.random.default_rng(seed)
        unet = self.bound_unet(batch_size)
        timesteps = inference_timesteps(self.scheduler_config, num_inference_steps)

        # 1. x_T ~ N(0, I), written straight into the UNet's bound input buffer.
        if latents is None:
            latents = generator.standard_normal(unet.sample.shape, dtype=np.float32)
        np.copyto(unet.sample, latents, casting="same_kind")

        if scheduler == "ddpm":
            step = self._ddpm_step_function(timesteps, variance_type)
        else:
            step = self._ddim_step_function(timesteps, eta, num_inference_steps)
        for i, t in enumerate(tqdm(timesteps, disable=not progress_bar, leave=False)):
            # 2. eps_theta(x_t, t).
            noise_pred = unet(int(t))
            # 3. x_{t-1} from x_t and eps, cast to float32 as it is written back into the input buffer.
            x_prev, pred_original_sample = step(i, unet.sample, noise_pred, generator)
            np.copyto(unet.sample, x_prev, casting="same_kind")
            if callback is not None:
                callback(i, int(t), unet.sample.copy(), pred_original_sample.astype(np.float32))

        images = to_image(unet.sample)
        return OnnxPipelineOutput(images=to_pil_images(images) if output_type == "pil" else images)

    def _clip(self, pred_original_sample: np.ndarray) -> np.ndarray:
        if self.scheduler_config.get("clip_sample", True):
            bound = self.scheduler_config.get("clip_sample_range", 1.0)
            np.clip(pred_original_sample, -bound, bound, out=pred_original_sample)
        return pred_original_sample

    def _check_epsilon_prediction(self) -> None:
        if self.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"only eps-prediction models are supported, the scheduler says "
                f"{self.scheduler_config.get('prediction_type')!r}."
            )

    def _ddpm_step_function(self, timesteps: np.ndarray, variance_type: str) -> Callable:
        """Ancestral step (Algorithm 2, line 4) on the (respaced) schedule, as `DDPMScheduler.step`."""
        self._check_epsilon_prediction()
        diffusion = respace(self.diffusion, timesteps)
        # sigma_t^2 as diffusers applies it: beta_t (fixed_large) or beta_tilde_t floored at 1e-20 (fixed_small).
        if variance_type.startswith("fixed_large"):
            sigmas = np.sqrt(diffusion.betas)
        else:
            sigmas = np.sqrt(np.maximum(diffusion.posterior_variance, 1e-20))
        num_steps = len(timesteps)

        def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
            k = np.full(x_t.shape[:1], num_steps - 1 - i)  # index into the respaced schedule
            # Eq. 15: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped to [-1, 1].
            pred_original_sample = self._clip(diffusion.predict_start_from_noise(x_t, k, noise_pred))
            # Eq. 7: mu_tilde_t(x_t, x_0); then + sigma_t z for t > 0.
            mean, _, _ = diffusion.q_posterior_mean_variance(pred_original_sample, x_t, k)
            if timesteps[i] > 0:
                mean += sigmas[k[0]] * generator.standard_normal(x_t.shape, dtype=np.float32)
            return mean, pred_original_sample

        return step

    def _ddim_step_function(self, timesteps: np.ndarray, eta: float, num_inference_steps: int) -> Callable:
        """DDIM step (Song et al. 2021, Eq. 12) as `DDIMScheduler.step` with `use_clipped_model_output=False`."""
        self._check_epsilon_prediction()
        diffusion = self.diffusion
        step_ratio = diffusion.num_timesteps // num_inference_steps
        final_alpha_cumprod = 1.0 if self.scheduler_config.get("set_alpha_to_one", True) else diffusion.alphas_cumprod[0]

        def step(i: int, x_t: np.ndarray, noise_pred: np.ndarray, generator: Any) -> tuple[np.ndarray, np.ndarray]:
            t, prev_t = int(timesteps[i]), int(timesteps[i]) - step_ratio
            alpha_bar_t = diffusion.alphas_cumprod[t]
            alpha_bar_prev = diffusion.alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
            pred_original_sample = self._clip(
                diffusion.predict_start_from_noise(x_t, np.full(x_t.shape[:1], t), noise_pred)
            )
            sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
            # x_{t-1} = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
            x_prev = np.sqrt(alpha_bar_prev) * pred_original_sample + np.sqrt(1.0 - alpha_bar_prev - sigma**2) * noise_pred
            if eta > 0:
                x_prev += sigma * generator.standard_normal(x_t.shape, dtype=np.float32)
            return x_prev, pred_original_sample

        return step

    def progressive_generation(
        self, batch_size: int = 1, num_inference_steps: int = 1000, every: int = 100, **kwargs: Any
    ) -> OnnxProgressiveOutput:
        r"""
        Sample while keeping x_t and the predicted x_0 every `every` steps (paper Fig. 6).

        Args:
            batch_size (`int`, *optional*, defaults to 1): The number of images.
            num_inference_steps (`int`, *optional*, defaults to 1000): The number of denoising steps.
            every (`int`, *optional*, defaults to 100): Keep a snapshot after every `every` steps and after the last.
            kwargs: Any other argument of `__call__` (`scheduler`, `seed`, `generator`, `latents`, ...).

        Returns:
            [`OnnxProgressiveOutput`]: the final images and the snapshots, NHWC in [0, 1].
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive integer, got {every!r}.")
        snapshots = SnapshotRecorder(every_k_steps(num_inference_steps, every))
        kwargs["output_type"] = "np"
        images = self(batch_size, num_inference_steps, callback=snapshots, **kwargs).images
        return OnnxProgressiveOutput(images, *snapshots.stacked(), snapshots.timesteps)


def resolve_export_folder(path: str | os.PathLike) -> Path:
    """`path` if it holds `ddpm_onnx.json`, else its `onnx/` sub-folder if that does."""
    folder = Path(path)
    if (folder / ONNX_METADATA_FILE).is_file():
        return folder
    if (folder / ONNX_SUBFOLDER / ONNX_METADATA_FILE).is_file():
        return folder / ONNX_SUBFOLDER
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist.")
    raise FileNotFoundError(
        f"{folder} holds no ONNX export ({ONNX_METADATA_FILE}, also not in {ONNX_SUBFOLDER}/); create one with "
        f"`ddpm export --model PIPELINE_DIR --output {folder}`."
    )


def model_file_in(folder: Path, model_file: Any) -> Path:
    """The model `ddpm_onnx.json` names, which must lie in the export folder (no `..`, no absolute path): an export
    never loads a network from elsewhere."""
    if not isinstance(model_file, str) or not _lies_in(folder, model_file):
        raise OnnxModelError(
            f"{folder / ONNX_METADATA_FILE} names the model {model_file!r}, which lies outside the export folder "
            f"{folder}; refusing to load it. Re-export with `ddpm export`."
        )
    return folder / model_file


def check_external_data(model_path: Path, folder: Path) -> None:
    """Refuse a model whose weights are kept in external data files outside the export folder.

    Recent onnxruntime releases refuse them themselves (1.31 does), older ones read them (1.20.1 does); and the
    `onnx` package may be missing here, so the locations are found in the protobuf bytes: an external data
    entry is the message `StringStringEntryProto {key: "location", value: ...}`, serialised key first, as
    `EXTERNAL_LOCATION` and a length-prefixed value.
    """
    import mmap

    if model_path.stat().st_size == 0:  # nothing to map; onnxruntime reports the empty file
        return
    with model_path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(EXTERNAL_LOCATION)
        while start != -1:
            length, offset = _varint(data, start + len(EXTERNAL_LOCATION))
            location = data[offset:offset + length].decode("utf-8", errors="replace")
            if not _lies_in(folder, location):
                raise OnnxModelError(
                    f"{model_path} keeps its weights in the external data file {location!r}, which lies outside "
                    f"the export folder {folder}; refusing to load it. Re-export with `ddpm export`."
                )
            start = data.find(EXTERNAL_LOCATION, offset + length)


def _load_session(
    model_path: Path, metadata: dict[str, Any], num_threads: int | None, providers: list
) -> ort.InferenceSession:
    """An onnxruntime session of `model_path`, or an [`OnnxModelError`] that says why it cannot load."""
    try:
        return ort.InferenceSession(str(model_path), session_options(num_threads), providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... classes
        if "opset" in str(error).lower():
            advice = "its opset is not supported by this onnxruntime: re-export with a lower `ddpm export --opset` or upgrade onnxruntime"
        elif "external data" in str(error).lower():
            advice = "onnxruntime refuses the external data file it names (outside the export folder, or missing): re-export it with `ddpm export`"
        else:
            advice = "the file is probably truncated or corrupt: re-export it with `ddpm export`"
        raise OnnxModelError(
            f"onnxruntime {ort.__version__} cannot load {model_path} ({model_path.stat().st_size} bytes, "
            f"exported at opset {metadata.get('opset')}); {advice}. onnxruntime said: {error}"
        ) from error


def _varint(data: Any, offset: int) -> tuple[int, int]:
    """The protobuf varint at `offset`, and the offset after it."""
    value, shift = 0, 0
    while offset < len(data):
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if not byte & 0x80:
            break
    return value, offset


def _lies_in(folder: Path, name: str) -> bool:
    """Whether the file `name` of `folder` is inside `folder` by its name: relative, and no `..` leads out. Symbolic
    links are not followed: the Hugging Face cache keeps every file of a snapshot as a link into its blob store."""
    normal = os.path.normpath(name)
    return not Path(name).is_absolute() and normal != ".." and not normal.startswith(".." + os.sep)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; re-export the folder with `ddpm export`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise OnnxModelError(f"{path} is not valid JSON: {error}") from error
