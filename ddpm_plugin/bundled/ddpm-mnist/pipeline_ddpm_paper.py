"""`DDPMPaperPipeline`: the stock `DDPMPipeline` plus what the DDPM paper and its users need.

This file is the pipeline's only copy. It imports nothing but the standard library, NumPy, torch, diffusers
and its siblings (`gaussian_diffusion.py`, `diffusion_ops.py`, `variational_bound.py`, `pipeline_outputs.py`), because
`save_pretrained` places these files in the saved folder's root, where `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_ddpm_paper",
trust_remote_code=True)` loads them on a machine without ddpm-plugin.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from diffusers import DDPMPipeline
from diffusers import __version__ as _diffusers_version
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from diffusers.utils.torch_utils import randn_tensor

from .diffusion_ops import q_sample, to_model_range
from .gaussian_diffusion import GaussianDiffusion
from .pipeline_outputs import (
    BitsPerDimOutput,
    InterpolationOutput,
    ProgressiveGenerationOutput,
    RateDistortionOutput,
    ReconstructionOutput,
)
from .variational_bound import calc_bpd_loop, check_variance_type, clip_range_of

STOCK_PIPELINE_CLASS = "DDPMPipeline"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_DIFFUSERS_RELEASE = tuple(int(part) for part in _diffusers_version.split(".")[:2])

Method = TypeVar("Method", bound=Callable[..., Any])


def unet_in_eval_mode(method: Method) -> Method:
    """Run a pipeline method with the UNet in eval mode (dropout off: the paper samples and evaluates the network
    without dropout), then give every submodule back the mode the caller left it in."""

    @functools.wraps(method)
    def wrapper(self: "DDPMPaperPipeline", *args: Any, **kwargs: Any) -> Any:
        modes = [(module, module.training) for module in self.unet.modules()]
        self.unet.eval()
        try:
            return method(self, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    return wrapper  # type: ignore[return-value]


class DDPMPaperPipeline(DDPMPipeline):
    r"""
    Unconditional image generation with the DDPM paper's sampler (Ho et al. 2020, Algorithm 2), and the
    paper's figures as methods.

    With no new arguments, `__call__` returns exactly what [`DDPMPipeline`] returns for the same generator.
    It adds the initial noise `latents`, a `start_timestep` to denoise a given x_t from (reconstruction and
    interpolation use it), `callback_on_step_end` (a function, a [`PipelineCallback`] or
    [`MultiPipelineCallbacks`]), `output_type="latent"`, DDIM's `eta`, and input validation. Any diffusers
    scheduler can be swapped in: `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.

    Precision follows diffusers: `DDPMPaperPipeline.from_pretrained(folder, dtype=torch.bfloat16)` (or
    `torch_dtype=`), or `pipe.to(torch.bfloat16)`, runs the network in bfloat16, while x_t, the noise and the
    scheduler's step stay float32 and the bound's terms are float64 after the network.

    Sampling, the bound and the figures run the UNet in eval mode (dropout off), whatever mode the caller left it
    in; its mode is restored afterwards.

    Saved folders record stock classes (`"_class_name": "DDPMPipeline"`) so plain diffusers loads them,
    and carry this file for `trust_remote_code` loading of the full class.

    Parameters:
        unet ([`UNet2DModel`]):
            The noise-prediction network eps_theta(x_t, t).
        scheduler ([`SchedulerMixin`]):
            [`DDPMScheduler`] as configured by `ddpm_plugin.paper_scheduler`, or any scheduler built from its
            config, such as [`DDIMScheduler`].
    """

    _callback_tensor_inputs = ["latents", "model_output", "pred_original_sample"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "DDPMPaperPipeline":
        """As [`DiffusionPipeline.from_pretrained`], which every keyword argument (`dtype`, `variant`, `revision`,
        `device_map`, `custom_pipeline`, ...) is passed on to, but weights load from safetensors only (nothing is
        unpickled) unless the caller explicitly passes `use_safetensors=False`."""
        kwargs.setdefault("use_safetensors", True)
        if "dtype" in kwargs and _DIFFUSERS_RELEASE < (0, 40):
            kwargs["torch_dtype"] = kwargs.pop("dtype")  # diffusers < 0.40 knows only `torch_dtype`
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, variant: str | None = None, **kwargs: Any
    ) -> None:
        """Save weights, configs, a stock `model_index.json`, and this pipeline's source files.

        Weights are written as safetensors (`diffusion_pytorch_model[.<variant>].safetensors`). With
        `safe_serialization=False` the pickled `.bin` that diffusers writes is added beside them, with a warning:
        loading still reads the safetensors, so the folder loads without unpickling anything. `model_index.json`
        names the stock `DDPMPipeline` so that `DiffusionPipeline.from_pretrained` needs no remote code;
        `pipeline_ddpm_paper.py` and the files it imports sit in the folder's root for
        `custom_pipeline="pipeline_ddpm_paper", trust_remote_code=True`.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "Save the folder first, then publish it with `ddpm push` (or `ddpm_plugin.hub.push_folder`)."
            )
        super().save_pretrained(save_directory, safe_serialization=True, variant=variant, **kwargs)
        if not safe_serialization:
            warnings.warn(
                "`safe_serialization=False`: writing pickled `.bin` weights beside the safetensors, which are what "
                "loading reads.",
                stacklevel=2,
            )
            super().save_pretrained(save_directory, safe_serialization=False, variant=variant, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        model_index = json.loads(index_path.read_text())
        model_index["_class_name"] = STOCK_PIPELINE_CLASS
        index_path.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
        for source in [__file__, *get_relative_import_files(__file__)]:
            shutil.copyfile(source, Path(save_directory) / Path(source).name)

    # --- Sampling (Algorithm 2). ---

    @property
    def diffusion(self) -> GaussianDiffusion:
        """The float64 coefficients of the scheduler's training schedule."""
        config = dict(self.scheduler.config)
        cached = getattr(self, "_diffusion_cache", None)
        if cached is None or cached[0] != config:
            cached = (config, GaussianDiffusion.from_config(config))
            self._diffusion_cache = cached
        return cached[1]

    @property
    def num_timesteps(self) -> int:
        """The number of denoising steps of the current (or last) `__call__`, as diffusers' callbacks expect."""
        return self._num_timesteps

    def image_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, height, width)

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str],
        start_timestep: int | None = None,
        float32_below_t: int = 0,
    ) -> None:
        self.check_float32_below_t(float32_below_t)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        max_steps = self.scheduler.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= max_steps:
            raise ValueError(f"`num_inference_steps` must be an integer in 1..{max_steps}, got {num_inference_steps!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)} generators but `batch_size` is {batch_size}.")
        expected = self.image_shape(batch_size)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"`latents` must have shape {expected}, got {tuple(latents.shape)}.")
        if start_timestep is not None and latents is None:
            raise ValueError("`start_timestep` needs `latents`: the x_t to denoise from that step.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        if isinstance(callback_on_step_end_tensor_inputs, str) or not all(
            name in self._callback_tensor_inputs for name in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a list of names from {self._callback_tensor_inputs}, "
                f"got {callback_on_step_end_tensor_inputs!r}."
            )

    def check_float32_below_t(self, float32_below_t: int) -> None:
        if isinstance(float32_below_t, bool) or not isinstance(float32_below_t, int) or float32_below_t < 0:
            raise ValueError(f"`float32_below_t` must be an integer >= 0, got {float32_below_t!r}.")

    def float32_network(self) -> torch.nn.Module:
        """The UNet in float32: itself, or a float32 copy of a half-precision UNet, made on first use and again
        whenever its weights change (it holds a second copy of the weights in float32)."""
        if self.unet.dtype == torch.float32:
            return self.unet
        key = (id(self.unet), self.unet.dtype, sum(parameter._version for parameter in self.unet.parameters()))
        cached = getattr(self, "_float32_copy", None)
        if cached is None or cached[0] != key:
            cached = (key, copy.deepcopy(self.unet).float())  # Module.float: diffusers' to(dtype) warns needlessly
            self._float32_copy = cached
        return cached[1]

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, float32_below_t: int = 0) -> torch.Tensor:
        """eps_theta(x_t, t) in the network's precision (and under any autocast the caller set), except for the
        elements with t < `float32_below_t`, which run in float32 with autocast off ([`float32_network`]):
        time-step-aware precision, since the bound weighs eps errors at small t most (docs/results/precision_quality_mnist.md)."""
        if not float32_below_t:
            return self.unet(x_t.to(self.unet.dtype), t).sample
        t = torch.as_tensor(t)
        if t.ndim == 0:  # one t for the whole batch, as in sampling: one network, no split, no device sync
            if int(t) < float32_below_t:
                return self._float32_eps(x_t, t)
            return self.unet(x_t.to(self.unet.dtype), t).sample
        t = t.to(x_t.device).expand(x_t.shape[0])  # the bound's batches mix t: split per element
        low = t < float32_below_t
        eps = torch.empty(x_t.shape, dtype=torch.promote_types(self.unet.dtype, torch.float32), device=x_t.device)
        if bool((~low).any()):
            eps[~low] = self.unet(x_t[~low].to(self.unet.dtype), t[~low]).sample.to(eps.dtype)
        if bool(low.any()):
            eps[low] = self._float32_eps(x_t[low], t[low]).to(eps.dtype)
        return eps

    def _float32_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_t.device.type, enabled=False):
            return self.float32_network()(x_t.float(), t).sample

    @torch.no_grad()
    @unet_in_eval_mode
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
        start_timestep: int | None = None,
        float32_below_t: int = 0,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images by ancestral sampling from x_T ~ N(0, I), or from a given x_t, down to x_0.

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                The number of images to generate.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic; a list gives one generator per image.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The number of denoising steps, 1..`num_train_timesteps`. The paper samples with all 1000.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (`PIL.Image`), `"np"` (`np.ndarray` in [0, 1], NHWC), `"pt"` (`torch.Tensor` in [0, 1],
                NCHW) or `"latent"` (the final x_0 as sampled: an NCHW `torch.Tensor` on the [-1, 1] scale, unclipped).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] instead of a plain tuple.
            latents (`torch.Tensor` of shape `(batch_size, channels, height, width)`, *optional*):
                The starting noise x_T (x_t with `start_timestep`). Drawn from `generator` when not given.
            eta (`float`, *optional*, defaults to 0.0):
                The DDIM stochasticity; passed only to schedulers whose `step` accepts it.
            callback_on_step_end (`Callable`, [`PipelineCallback`] or [`MultiPipelineCallbacks`], *optional*):
                Called after every step as `callback_on_step_end(pipe, i, t, callback_kwargs)`, with
                `callback_kwargs` holding the tensors named in `callback_on_step_end_tensor_inputs`. It returns a
                dict; a `"latents"` entry replaces x_{t-1}. For a callback object the names are its `tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                Any of `_callback_tensor_inputs`: `"latents"` (x_{t-1}), `"model_output"` (eps_theta(x_t, t)) and
                `"pred_original_sample"` (the predicted x_0).
            start_timestep (`int`, *optional*):
                Denoise `latents` as x_t from this step of the `num_inference_steps` schedule down to x_0 (the
                schedule's `timesteps[t_start:]`, as in diffusers' image-to-image pipelines) instead of from x_T;
                [`~DDPMPaperPipeline.schedule_timestep`] gives the step of a schedule at or below any t.
            float32_below_t (`int`, *optional*, defaults to 0):
                Steps with t below this run the network in float32 with autocast off (time-step-aware precision,
                [`~DDPMPaperPipeline.predict_eps`]): sample in bf16 (autocast or bf16 weights) with the steps the
                bound weighs most in float32.

        Example:

        ```py
        >>> from ddpm_plugin import DDPMPaperPipeline
        >>> pipe = DDPMPaperPipeline.from_pretrained("path/to/pipeline")
        >>> images = pipe(batch_size=4, generator=torch.manual_seed(0)).images
        ```

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images; with `return_dict=False` a
            tuple whose first element is the list (or array) of images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(batch_size, num_inference_steps, generator, latents, output_type, callback_on_step_end,
                          callback_on_step_end_tensor_inputs, start_timestep, float32_below_t)
        device = self._execution_device
        # x_t, and with it the scheduler's step and noise, stays float32 when the network runs in half precision.
        sample_dtype = torch.promote_types(self.unet.dtype, torch.float32)

        # 1. The schedule: all of it, or from `start_timestep` on (img2img's `timesteps[t_start:]`).
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        if start_timestep is not None:
            t_start = torch.nonzero(timesteps == start_timestep).flatten()
            if len(t_start) == 0:
                raise ValueError(
                    f"`start_timestep` must be a step of the {num_inference_steps}-step schedule (see "
                    f"`schedule_timestep`), got {start_timestep!r}."
                )
            timesteps = timesteps[int(t_start[0]) :]
        self._num_timesteps = len(timesteps)
        step_kwargs = {"generator": generator}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["eta"] = eta

        # 2. x_T ~ N(0, I), drawn exactly as the stock pipeline draws it, unless x_T (or x_t) is given.
        if latents is None:
            latents = randn_tensor(self.image_shape(batch_size), generator=generator, device=device, dtype=sample_dtype)
        else:
            latents = latents.to(device=device, dtype=sample_dtype)

        for i, t in enumerate(self.progress_bar(timesteps)):
            # 3. eps_theta(x_t, t), in the network's precision.
            model_output = self.predict_eps(latents, t, float32_below_t).to(sample_dtype)
            # 4. x_{t-1} ~ p_theta(x_{t-1} | x_t): x_0 from eps_theta (Eq. 15), clipped, then the posterior mean
            #    mu~_t(x_t, x_0) (Eq. 7) plus sigma_t z.
            step = self.scheduler.step(model_output, t, latents, **step_kwargs)
            x_t, latents = latents, step.prev_sample
            if callback_on_step_end is not None:
                pred_original_sample = getattr(step, "pred_original_sample", None)
                if pred_original_sample is None:  # schedulers such as DPM-Solver++ return none: Eq. 15, unclipped
                    alpha_bar = self.scheduler.alphas_cumprod[int(t)].to(device=device, dtype=sample_dtype)
                    pred_original_sample = (x_t - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
                available = {
                    "latents": latents,
                    "model_output": model_output,
                    "pred_original_sample": pred_original_sample,
                }
                callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.get("latents", latents)

        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def postprocess(self, sample: torch.Tensor, output_type: str = "pil") -> Any:
        """Map x in [-1, 1] (NCHW) to [0, 1] as a tensor (`"pt"`), an NHWC array (`"np"`) or PIL images; `"latent"`
        returns `sample` itself."""
        if output_type == "latent":
            return sample
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image

    # --- Paper figures. ---

    def progressive_generation(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1000,
        every: int = 100,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> ProgressiveGenerationOutput:
        r"""
        Sample while keeping x_t and the predicted x_0 every `every` steps (paper Fig. 6).

        Args:
            batch_size (`int`, *optional*, defaults to 1): The number of images.
            num_inference_steps (`int`, *optional*, defaults to 1000): The number of denoising steps.
            every (`int`, *optional*, defaults to 100): Keep a snapshot after every `every` steps and after the last.
            generator (`torch.Generator`, *optional*): Makes generation deterministic.
            latents (`torch.Tensor`, *optional*): The starting noise x_T.

        Returns:
            [`ProgressiveGenerationOutput`]: the final images and the snapshots, NHWC in [0, 1].
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive integer, got {every!r}.")
        x_t, pred_x0, timesteps = [], [], []

        def keep_snapshot(pipe: "DDPMPaperPipeline", i: int, t: torch.Tensor, tensors: dict) -> dict:
            if (i + 1) % every == 0 or i + 1 == num_inference_steps:
                x_t.append(self.postprocess(tensors["latents"], "np"))
                pred_x0.append(self.postprocess(tensors["pred_original_sample"], "np"))
                timesteps.append(int(t))
            return {}

        images = self(
            batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps, output_type="np",
            latents=latents, callback_on_step_end=keep_snapshot,
            callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
        ).images
        return ProgressiveGenerationOutput(
            images=images, x_t=np.stack(x_t), pred_original_sample=np.stack(pred_x0), timesteps=timesteps
        )

    def preprocess(self, images: np.ndarray | torch.Tensor | list) -> torch.Tensor:
        """8-bit images (`uint8` NHWC or NHW array or tensor, or a list of PIL images) as x_0 = x / 127.5 - 1,
        NCHW float32 on the execution device. Float images are refused: the bound is for discrete data."""
        if isinstance(images, list):
            images = np.stack([np.asarray(image) for image in images])
        images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if images.dtype != torch.uint8:
            raise ValueError(f"`images` must be 8-bit (uint8, 0..255, NHWC), got dtype {images.dtype}.")
        if images.ndim == 3:
            images = images[..., None]
        expected = self.image_shape(images.shape[0])
        if images.ndim != 4 or tuple(images.shape[1:]) != (expected[2], expected[3], expected[1]):
            raise ValueError(
                f"`images` must have shape (N, {expected[2]}, {expected[3]}, {expected[1]}) for this model, "
                f"got {tuple(images.shape)}."
            )
        return to_model_range(images.permute(0, 3, 1, 2)).to(self._execution_device)

    @torch.no_grad()
    @unet_in_eval_mode
    def bits_per_dim(
        self,
        images: np.ndarray | torch.Tensor | list,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
        float32_below_t: int = 0,
    ) -> BitsPerDimOutput:
        r"""
        The negative log-likelihood bound of 8-bit images in bits/dim (paper Eq. 5, Table 2), with its breakdown.

        Each image is noised at all T steps; every UNet pass evaluates `batch_size` (image, t) pairs, so a
        batch of images costs one pass per t, and fewer images share a pass across several t. The x_t are drawn
        from `generator`, so the estimate is a single-sample Monte Carlo estimate per term, as in the paper.

        Args:
            images (`np.ndarray`, `torch.Tensor` or `list[PIL.Image]`):
                uint8 images (N, H, W, C) or (N, H, W), mapped to [-1, 1] without dequantisation.
            batch_size (`int`, *optional*, defaults to 64): UNet inputs per pass.
            generator (`torch.Generator`, *optional*): Makes the noise, hence the estimate, deterministic.
            float32_below_t (`int`, *optional*, defaults to 0): The terms with t below this evaluate the network in
                float32 with autocast off, as `__call__(float32_below_t=...)` samples.

        Example:

        ```py
        >>> bpd = pipe.bits_per_dim(test_images[:100], batch_size=100, generator=torch.manual_seed(0))
        >>> bpd.total_bpd.mean(), bpd.rate_bpd.mean(), bpd.decoder_bpd.mean()
        ```

        Returns:
            [`BitsPerDimOutput`]: per-image totals and per-t terms, the prior and decoder terms, and the
            rate-distortion curve.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if isinstance(generator, list):
            raise ValueError("`generator` must be a single `torch.Generator` for `bits_per_dim`.")
        self.check_float32_below_t(float32_below_t)
        config = self.scheduler.config
        variance_type = check_variance_type(config.get("variance_type"))
        terms = calc_bpd_loop(
            lambda x_t, t: self.predict_eps(x_t, t, float32_below_t), self.diffusion, variance_type,
            self.preprocess(images), batch_size=batch_size, generator=generator, progress_bar=self.progress_bar,
            clip_range=clip_range_of(config),
        )
        return BitsPerDimOutput.from_terms(terms)

    def rate_distortion(
        self,
        images: np.ndarray | torch.Tensor | list,
        batch_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> RateDistortionOutput:
        r"""
        The rate-distortion curve of 8-bit images (paper Fig. 5, Table 4): `bits_per_dim(...).rate_distortion()`.
        With the bound wanted too, call [`~DDPMPaperPipeline.bits_per_dim`] and its output's `rate_distortion()`.

        Args:
            images (`np.ndarray`, `torch.Tensor` or `list[PIL.Image]`): uint8 images, as for `bits_per_dim`.
            batch_size (`int`, *optional*, defaults to 64): UNet inputs per pass.
            generator (`torch.Generator`, *optional*): Makes the estimate deterministic.

        Returns:
            [`RateDistortionOutput`]: rate (bits/dim) and distortion (RMSE, 0..255) at each t, and the totals.
        """
        return self.bits_per_dim(images, batch_size=batch_size, generator=generator).rate_distortion()

    def schedule_timestep(self, timestep: int, num_inference_steps: int) -> int:
        """The latest step of the `num_inference_steps` sampling schedule at or before `timestep` (0..T-1). It asks
        a copy of the scheduler: `self.scheduler` keeps its own timesteps."""
        num_timesteps = self.scheduler.config.num_train_timesteps
        if not isinstance(timestep, (int, np.integer)) or not 0 <= timestep < num_timesteps:
            raise ValueError(f"`timestep` must be an integer in 0..{num_timesteps - 1}, got {timestep!r}.")
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_timesteps:
            raise ValueError(f"`num_inference_steps` must be an integer in 1..{num_timesteps}, got {num_inference_steps!r}.")
        schedule = type(self.scheduler).from_config(self.scheduler.config)
        schedule.set_timesteps(num_inference_steps)
        return int(schedule.timesteps[schedule.timesteps <= timestep].max())

    def reconstruct(
        self,
        images: np.ndarray | torch.Tensor | list,
        timestep: int = 500,
        num_samples: int = 4,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 1000,
    ) -> ReconstructionOutput:
        r"""
        Samples of p_theta(x_0 | x_t) that share one x_t ~ q(x_t | x_0) per image (paper Fig. 7): the larger t,
        the less of x_0 survives beyond its coarse attributes.

        Args:
            images (`np.ndarray`, `torch.Tensor` or `list[PIL.Image]`): uint8 images x_0 (N, H, W, C).
            timestep (`int`, *optional*, defaults to 500): The step t in 0..T-1 to noise to and denoise from.
            num_samples (`int`, *optional*, defaults to 4): Samples of x_0 per shared x_t.
            generator (`torch.Generator`, *optional*): Makes the noise deterministic.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The sampling schedule; `timestep` moves down to the nearest of its steps.

        Returns:
            [`ReconstructionOutput`]: the shared x_t and `num_samples` reconstructions per image, NHWC in [0, 1].
        """
        timestep = self.schedule_timestep(timestep, num_inference_steps)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
        x_start = self.preprocess(images)
        t = torch.full((x_start.shape[0],), timestep, device=x_start.device)
        noise = randn_tensor(x_start.shape, generator=generator, device=x_start.device, dtype=torch.float32)
        x_t = q_sample(self.diffusion, x_start, t, noise)
        images_out = self(
            batch_size=x_t.shape[0] * num_samples, generator=generator, num_inference_steps=num_inference_steps,
            output_type="np", latents=x_t.repeat_interleave(num_samples, dim=0), start_timestep=timestep,
        ).images
        return ReconstructionOutput(
            x_t=self.postprocess(x_t, "np"),
            images=images_out.reshape(x_start.shape[0], num_samples, *images_out.shape[1:]),
            timestep=timestep,
        )

    def interpolate(
        self,
        image_a: np.ndarray | torch.Tensor,
        image_b: np.ndarray | torch.Tensor,
        timestep: int = 500,
        lambdas: np.ndarray | list[float] | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 1000,
    ) -> InterpolationOutput:
        r"""
        Interpolate two images in the latent x_t (paper Fig. 8-9): x_t and x'_t are drawn with the same noise,
        mixed as (1 - lambda) x_t + lambda x'_t, and decoded with the same reverse-process noise for every lambda.

        Args:
            image_a (`np.ndarray` or `torch.Tensor`): A uint8 image (H, W, C) or (H, W), lambda = 0.
            image_b (`np.ndarray` or `torch.Tensor`): A uint8 image of the same shape, lambda = 1.
            timestep (`int`, *optional*, defaults to 500): The step t in 0..T-1 to interpolate at.
            lambdas (`list[float]`, *optional*): Mixing weights in [0, 1]; 11 evenly spaced by default.
            generator (`torch.Generator`, *optional*): Makes the noise deterministic.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The sampling schedule; `timestep` moves down to the nearest of its steps.

        Returns:
            [`InterpolationOutput`]: one decoded image per lambda, NHWC in [0, 1].
        """
        timestep = self.schedule_timestep(timestep, num_inference_steps)
        lambdas = np.linspace(0.0, 1.0, 11) if lambdas is None else np.asarray(lambdas, dtype=np.float64)
        if lambdas.ndim != 1 or lambdas.size < 1 or lambdas.min() < 0 or lambdas.max() > 1:
            raise ValueError(f"`lambdas` must be a non-empty list of values in [0, 1], got {lambdas.tolist()!r}.")
        if isinstance(generator, list):
            raise ValueError("`generator` must be a single `torch.Generator` for `interpolate`.")
        x_start = self.preprocess(torch.stack([torch.as_tensor(np.asarray(image_a)), torch.as_tensor(np.asarray(image_b))]))
        device = x_start.device
        # 1. x_t and x'_t from the same noise (Eq. 4).
        noise = randn_tensor((1, *x_start.shape[1:]), generator=generator, device=device, dtype=torch.float32)
        x_t = q_sample(self.diffusion, x_start, torch.full((2,), timestep, device=device), noise.expand_as(x_start))
        # 2. The mixed latents, one per lambda.
        weight = torch.as_tensor(lambdas, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)
        latents = (1.0 - weight) * x_t[:1] + weight * x_t[1:]
        # 3. Decode every lambda with the same reverse-process noise: one identically seeded generator each.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(len(lambdas))]
        images = self(
            batch_size=len(lambdas), generator=generators, num_inference_steps=num_inference_steps, output_type="np",
            latents=latents, start_timestep=timestep,
        ).images
        return InterpolationOutput(images=images, lambdas=lambdas, timestep=timestep)
