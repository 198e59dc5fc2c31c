"""`OnnxDDPMPipeline`: the DDPM sampler (Ho et al. 2020, Algorithm 2) and DDIM on ONNX Runtime, without PyTorch.

It loads the folder [`export_onnx`] writes (`model.onnx`, `scheduler/scheduler_config.json`, `ddpm_onnx.json`),
once `onnx_folder.open_export_folder` has checked it, and runs the denoising loop with the NumPy steps of
`numpy_sampler` on the float64 coefficients of [`GaussianDiffusion`]. Given the same initial noise and per-step noise it reproduces `DDPMPaperPipeline` with
diffusers' `DDPMScheduler` (any `num_inference_steps`) or `DDIMScheduler.from_config(...)` (any `eta`).

The network runs on onnxruntime (any execution provider) or, with `engine="openvino"`, on OpenVINO's CPU runtime
in float32 or bfloat16 (`openvino_engine`); the loop is the same.

This module imports only the standard library, NumPy, onnxruntime, Pillow, tqdm and torch-free modules of
ddpm-plugin (OpenVINO only when it is the engine), so it works where `import torch` fails.

Speed: the UNet's input, timestep and output live in buffers bound once per batch size (IO binding), so a
step costs one `run_with_iobinding` and a few NumPy operations on the sample, with nothing re-bound. On CPU
the bound buffers are the NumPy arrays themselves (shared memory); on CUDA they are device buffers at fixed
addresses, which is what ORT's CUDA graphs need (`cuda_graph=True`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from ddpm_plugin.images import SnapshotRecorder, every_k_steps, to_image, to_pil_images
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.model_folder import FLOAT32_BYTES, SAMPLE_BUFFERS
from ddpm_plugin.trust import check_allocation
from ddpm_plugin.vocabulary import BF16_FLOAT32_BELOW_T, Sampler, VarianceType, check_sampler, check_steps

from .numpy_sampler import (
    UNetBuffers,
    ddim_sigma, ddim_step_function, ddpm_step_function, dpm_solver_step_function, dpm_solver_timesteps,
    inference_timesteps, respace,
)
from .onnx_folder import (
    FORMAT_VERSION,
    OnnxModelError,
    export_precision,
    model_file_in,
    open_export_folder,
    resolve_export_folder,
)
from .providers import CUDA, ProviderSpec, resolve_providers
from .providers import session_options as default_session_options

__all__ = [
    "FORMAT_VERSION", "BoundUNet", "OnnxDDPMPipeline", "OnnxModelError", "OnnxPipelineOutput", "OnnxProgressiveOutput",
    "ddim_sigma", "inference_timesteps", "model_file_in", "resolve_export_folder", "respace",
]

MAX_BOUND_BATCH_SIZES = 8  # buffers kept bound for this many batch sizes
Engine = Literal["onnxruntime", "openvino"]
ENGINES: tuple[Engine, ...] = get_args(Engine)
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], None]

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


# --- The UNet with pre-bound buffers. ---


class BoundUNet(UNetBuffers):
    """eps_theta(x_t, t) for one batch size, with input and output bound once (IO binding).

    `sample` (float32 NCHW) and `timestep` (int64) are host arrays the caller writes into; `__call__` returns
    the host array holding eps. On CPU these arrays *are* the bound buffers; on CUDA the bound buffers are
    device tensors at fixed addresses (CUDA-graph friendly), updated in place from the host arrays.

    The rules ORT's CUDA graphs need hold by construction: input and output are distinct buffers (capture runs
    the model more than once in its first call, so an output written over its input would be applied twice);
    values are copied into the buffers bound once, never re-bound (a replayed graph reads the captured
    addresses), so the arrays are read-only attributes; and each batch size has its own `graph_id`.

    With a `float32_session` (an int8 export's float32 graph) the same buffers are bound to it too, and it runs
    for t < `float32_below_t` (time-step-aware precision).
    """

    def __init__(
        self, session: ort.InferenceSession, shape: tuple[int, ...], device: str, graph_id: int | None = None,
        float32_session: ort.InferenceSession | None = None, float32_below_t: int = 0,
    ) -> None:
        super().__init__(shape)
        self.device = device
        self.float32_below_t = float32_below_t if float32_session is not None else 0
        # No RunOptions unless needed: onnxruntime looks up `gpu_graph_id` in them on every run, and a missing
        # entry costs a C++ exception.
        self.run_options = None
        if graph_id is not None:  # one captured CUDA graph per batch size (and session)
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        arrays = (self._sample, self._timestep, self._noise_pred)
        if device == "cpu":
            # OrtValues over NumPy memory: ORT reads `sample` and writes `noise_pred` in place.
            self._values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
        else:
            self._values = [ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for array in arrays]
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
        engine (`OpenVinoEngine`, *optional*):
            Runs the network on OpenVINO in place of `session` (which is then `None`).

    One call at a time per instance: the bound buffers are shared between calls (the demo keeps one instance
    per concurrent request).
    """

    def __init__(
        self, session: ort.InferenceSession, scheduler_config: dict[str, Any], metadata: dict[str, Any],
        cuda_graph: bool = False, float32_session: ort.InferenceSession | None = None, engine: Any = None,
    ) -> None:
        self.session = session
        self.float32_session = float32_session
        self.engine = engine
        self.float32_below_t = int(metadata.get("float32_below_t") or 0) if float32_session is not None else 0
        if engine is not None:
            self.float32_below_t = engine.float32_below_t
        self.scheduler_config = dict(scheduler_config)
        self.metadata = dict(metadata)
        self.diffusion = GaussianDiffusion.from_config(self.scheduler_config)
        self.device = "cuda" if session is not None and session.get_providers()[0] == CUDA else "cpu"
        self.cuda_graph = cuda_graph
        self._bound: dict[int, Any] = {}
        for model in (session, float32_session):
            if model is not None:
                self._check_model_interface(model)

    @property
    def providers(self) -> list[str]:
        """What runs the network: onnxruntime's execution providers, or the OpenVINO device and precision."""
        return self.engine.providers if self.engine is not None else self.session.get_providers()

    @property
    def precision(self) -> str:
        """The precision the network runs in: the export's (`fp32`, `fp16`, `int8`), or OpenVINO's."""
        if self.engine is not None:
            return self.engine.precision
        return export_precision(self.metadata)

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
        session_options: ort.SessionOptions | None = None,
        engine: Engine = "onnxruntime",
        precision: str | None = None,
        float32_below_t: int | None = None,
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
            session_options (`onnxruntime.SessionOptions`, *optional*):
                The options of every session, in place of `providers.session_options(num_threads)`.
            engine (`str`, *optional*, defaults to `"onnxruntime"`):
                `"onnxruntime"` or `"openvino"` (OpenVINO's CPU runtime, `pip install "ddpm-plugin[openvino]"`;
                a float32 export only; `provider`, `cuda_graph` and `session_options` are onnxruntime's).
            precision (`str`, *optional*):
                OpenVINO's: `"fp32"` (the default) or `"bf16"`. onnxruntime runs the export's own precision,
                which this may name.
            float32_below_t (`int`, *optional*):
                With OpenVINO bf16, the t below which the float32 compilation runs (default
                `BF16_FLOAT32_BELOW_T`; 0: bf16 at every t).

        An int8 export with `float32_below_t` in its metadata loads its float32 graph as well and runs it for
        t < `float32_below_t` (`ddpm_plugin.export.quantize`).

        Raises:
            `FileNotFoundError`: a file of the folder is missing.
            [`OnnxModelError`]: the model is truncated or corrupt, does not fit the metadata, or uses an opset
            this onnxruntime cannot run.
            [`StaleExportError`]: the export sits in a pipeline folder whose weights changed since it was made.
        """
        if engine not in ENGINES:
            raise ValueError(f"`engine` must be one of {list(ENGINES)}, got {engine!r}.")
        export = open_export_folder(path)
        model_path, float32_path, metadata = export.model_path, export.float32_path, export.metadata
        if engine == "openvino":
            return cls._from_export_on_openvino(export, provider, num_threads, cuda_graph, session_options,
                                                precision or "fp32", float32_below_t)
        exported = export_precision(metadata)
        if precision not in (None, exported) or float32_below_t is not None:
            raise ValueError(f"onnxruntime runs the export's own precision ({exported}); `precision` {precision!r} "
                             f"and `float32_below_t` are the OpenVINO engine's (`engine=\"openvino\"`).")
        providers = resolve_providers(provider)
        names = [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in providers]
        if cuda_graph:
            if CUDA not in names:
                raise ValueError("`cuda_graph=True` needs the CUDA execution provider.")
            providers = [(CUDA, {"enable_cuda_graph": "1"}) if name == CUDA else name for name in names]
        options = session_options or default_session_options(num_threads)
        session = _load_session(model_path, metadata, options, providers)
        float32_session = None if float32_path is None else _load_session(float32_path, metadata, options, providers)
        return cls(session, export.scheduler_config, metadata, cuda_graph=cuda_graph, float32_session=float32_session)

    @classmethod
    def _from_export_on_openvino(
        cls, export: Any, provider: ProviderSpec, num_threads: int | None, cuda_graph: bool,
        session_options: ort.SessionOptions | None, precision: str, float32_below_t: int | None,
    ) -> "OnnxDDPMPipeline":
        if provider not in ("auto", "cpu") or cuda_graph or session_options is not None:
            raise ValueError("`provider`, `cuda_graph` and `session_options` are onnxruntime's; the OpenVINO engine "
                             "runs on the CPU with `num_threads` threads.")
        exported = export_precision(export.metadata)
        if exported != "fp32":
            raise OnnxModelError(f"{export.folder} is a {exported} export; the OpenVINO engine runs a float32 export "
                                 f"(and makes bf16 from it itself): export one with `ddpm export` without --quantize/--fp16.")
        from .openvino_engine import OpenVinoEngine

        below = (BF16_FLOAT32_BELOW_T if float32_below_t is None else float32_below_t) if precision == "bf16" else 0
        engine = OpenVinoEngine(export.model_path, export.image_shape, precision, num_threads, below)
        return cls(None, export.scheduler_config, export.metadata, engine=engine)

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
        """The UNet with buffers bound for `batch_size` (created, or compiled by OpenVINO, once per batch size,
        then reused)."""
        if batch_size not in self._bound:
            check_allocation(batch_size * int(np.prod(self.image_shape)) * FLOAT32_BYTES * SAMPLE_BUFFERS,
                             f"`batch_size` {batch_size} of {'x'.join(map(str, self.image_shape))} images")
            if len(self._bound) >= MAX_BOUND_BATCH_SIZES and not self.cuda_graph:
                self._bound.pop(next(iter(self._bound)))  # forget the oldest batch size's buffers
            graph_id = len(self._bound) + 1 if self.cuda_graph else None
            if self.engine is not None:
                self._bound[batch_size] = self.engine.bind(batch_size)
                return self._bound[batch_size]
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
                `DDIMScheduler.from_config` of the same configuration) or `"dpmsolver++"` (Lu et al. 2022,
                second-order multistep in data prediction, as `DPMSolverMultistepScheduler(algorithm_type=
                "dpmsolver++", solver_order=2)` of the same configuration; deterministic).
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's stochasticity (0: deterministic, 1: DDPM-like); ignored by `"ddpm"` and `"dpmsolver++"`.
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
        if scheduler == "dpmsolver++":
            timesteps = dpm_solver_timesteps(self.scheduler_config, num_inference_steps)
        else:
            timesteps = inference_timesteps(self.scheduler_config, num_inference_steps)

        # 1. x_T ~ N(0, I), written straight into the UNet's bound input buffer.
        if latents is None:
            latents = generator.standard_normal(unet.sample.shape, dtype=np.float32)
        np.copyto(unet.sample, latents, casting="same_kind")

        if scheduler == "ddpm":
            step = ddpm_step_function(self.diffusion, self.scheduler_config, timesteps, variance_type)
        elif scheduler == "dpmsolver++":
            step = dpm_solver_step_function(self.diffusion, self.scheduler_config, timesteps)
        else:
            step = ddim_step_function(self.diffusion, self.scheduler_config, timesteps, eta, num_inference_steps)
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


def _load_session(
    model_path: Path, metadata: dict[str, Any], options: ort.SessionOptions, providers: list
) -> ort.InferenceSession:
    """An onnxruntime session of `model_path`, or an [`OnnxModelError`] that says why it cannot load."""
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... classes
        if "graph capture" in str(error).lower():
            advice = "CUDA graphs need every node of the model on the CUDA provider and onnxruntime placed some on the CPU: load it with `cuda_graph=False`"
        elif "opset" in str(error).lower():
            advice = "its opset is not supported by this onnxruntime: re-export with a lower `ddpm export --opset` or upgrade onnxruntime"
        elif "external data" in str(error).lower():
            advice = "onnxruntime refuses the external data file it names (outside the export folder, or missing): re-export it with `ddpm export`"
        else:
            advice = "the file is probably truncated or corrupt: re-export it with `ddpm export`"
        raise OnnxModelError(
            f"onnxruntime {ort.__version__} cannot load {model_path} ({model_path.stat().st_size} bytes, "
            f"exported at opset {metadata.get('opset')}); {advice}. onnxruntime said: {error}"
        ) from error

