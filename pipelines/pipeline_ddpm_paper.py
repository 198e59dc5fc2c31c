"""`DDPMPaperPipeline`: the stock `DDPMPipeline` plus what the DDPM paper and its users need.

This file is the pipeline's only copy. It imports nothing but the standard library, NumPy, torch, diffusers
and its sibling `gaussian_diffusion.py`, because `save_pretrained` places both files in the saved folder's
root, where `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_ddpm_paper",
trust_remote_code=True)` loads them on a machine without ddpm-plugin.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DDPMPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.dynamic_modules_utils import get_relative_import_files
from diffusers.utils.torch_utils import randn_tensor

from .gaussian_diffusion import GaussianDiffusion

CUSTOM_PIPELINE_NAME = Path(__file__).stem
STOCK_PIPELINE_CLASS = "DDPMPipeline"
CALLBACK_TENSOR_INPUTS = ("latents", "model_output", "pred_original_sample")


@dataclass
class ProgressiveGenerationOutput(BaseOutput):
    """Output of [`DDPMPaperPipeline.progressive_generation`] (paper Fig. 6).

    Args:
        images (`np.ndarray` of shape `(batch_size, height, width, channels)`):
            The final samples x_0 in [0, 1].
        x_t (`np.ndarray` of shape `(num_snapshots, batch_size, height, width, channels)`):
            The noisy samples x_t at each snapshot, mapped from [-1, 1] to [0, 1] and clipped.
        pred_original_sample (`np.ndarray` of the same shape as `x_t`):
            The model's prediction of x_0 from x_t at each snapshot, in [0, 1].
        timesteps (`list[int]`):
            The timestep t of each snapshot.
    """

    images: np.ndarray
    x_t: np.ndarray
    pred_original_sample: np.ndarray
    timesteps: list[int]


def stock_diffusers_class(component: Any) -> tuple[str, str]:
    """The `("diffusers", name)` entry of the nearest stock diffusers class of a pipeline component."""
    for klass in type(component).__mro__:
        if klass.__module__.split(".")[0] == "diffusers":
            return ("diffusers", klass.__name__)
    raise ValueError(f"{type(component).__name__} derives from no diffusers class and cannot be saved loadably.")


class DDPMPaperPipeline(DDPMPipeline):
    r"""
    Unconditional image generation with the DDPM paper's sampler (Ho et al. 2020, Algorithm 2), and the
    paper's figures as methods.

    With no new arguments, `__call__` returns exactly what [`DDPMPipeline`] returns for the same generator.
    It adds the initial noise `latents`, `callback_on_step_end`, DDIM's `eta`, and input validation. Any
    diffusers scheduler can be swapped in: `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.

    Saved folders record stock classes (`"_class_name": "DDPMPipeline"`) so plain diffusers loads them,
    and carry this file for `trust_remote_code` loading of the full class.

    Parameters:
        unet ([`UNet2DModel`]):
            The noise-prediction network eps_theta(x_t, t).
        scheduler ([`SchedulerMixin`]):
            [`DDPMScheduler`] as configured by `ddpm_plugin.paper_scheduler`, or any scheduler built from its
            config, such as [`DDIMScheduler`].
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "DDPMPaperPipeline":
        """As [`DiffusionPipeline.from_pretrained`], but weights load from safetensors only (nothing is
        unpickled) unless the caller explicitly passes `use_safetensors=False`."""
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, variant: str | None = None, **kwargs: Any
    ) -> None:
        """Save weights (safetensors), configs, a stock `model_index.json`, and this pipeline's source files.

        `model_index.json` names stock diffusers classes so that `DiffusionPipeline.from_pretrained` needs no
        remote code; `pipeline_ddpm_paper.py` and the files it imports sit in the folder's root for
        `custom_pipeline="pipeline_ddpm_paper", trust_remote_code=True`.
        """
        if not safe_serialization:
            raise ValueError("`safe_serialization=False` would write pickled weights; ddpm-plugin saves safetensors only.")
        if kwargs.get("push_to_hub"):
            raise ValueError("Save the folder first, then publish it with `ddpm push` (or `ddpm_plugin.hub.push`).")
        super().save_pretrained(save_directory, safe_serialization=True, variant=variant, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        model_index = json.loads(index_path.read_text())
        model_index["_class_name"] = STOCK_PIPELINE_CLASS
        for name in self.components:
            model_index[name] = list(stock_diffusers_class(getattr(self, name)))
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
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str],
    ) -> None:
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
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be one of 'pil', 'np', 'pt', got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSOR_INPUTS)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may name only {list(CALLBACK_TENSOR_INPUTS)}, got {sorted(unknown)}."
            )

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        callback_on_step_end: Callable[["DDPMPaperPipeline", int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images by ancestral sampling from x_T ~ N(0, I) down to x_0.

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                The number of images to generate.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic; a list gives one generator per image.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                The number of denoising steps, 1..`num_train_timesteps`. The paper samples with all 1000.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (`PIL.Image`), `"np"` (`np.ndarray` in [0, 1], NHWC) or `"pt"` (`torch.Tensor`, NCHW).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] instead of a plain tuple.
            latents (`torch.Tensor` of shape `(batch_size, channels, height, width)`, *optional*):
                The starting noise x_T. Drawn from `generator` when not given.
            eta (`float`, *optional*, defaults to 0.0):
                The DDIM stochasticity; passed only to schedulers whose `step` accepts it.
            callback_on_step_end (`Callable`, *optional*):
                Called after every step as `callback_on_step_end(pipe, i, t, callback_kwargs)`, with
                `callback_kwargs` holding the tensors named in `callback_on_step_end_tensor_inputs`. It returns a
                dict; a `"latents"` entry replaces x_{t-1}.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                Any of `"latents"` (x_{t-1}), `"model_output"` (eps_theta(x_t, t)) and
                `"pred_original_sample"` (the predicted x_0).

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
        self.check_inputs(
            batch_size, num_inference_steps, generator, latents, output_type, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device

        # 1. x_T ~ N(0, I), drawn exactly as the stock pipeline draws it.
        if latents is None:
            latents = randn_tensor(self.image_shape(batch_size), generator=generator, device=device, dtype=self.unet.dtype)
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        step_kwargs = {"generator": generator}
        if "eta" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["eta"] = eta

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            # 2. eps_theta(x_t, t).
            model_output = self.unet(latents, t).sample
            # 3. x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-alpha_bar_t) eps_theta) + sigma_t z (Eq. 11).
            step = self.scheduler.step(model_output, t, latents, **step_kwargs)
            latents = step.prev_sample
            if callback_on_step_end is not None:
                available = {
                    "latents": latents,
                    "model_output": model_output,
                    "pred_original_sample": step.pred_original_sample,
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
        """Map x in [-1, 1] (NCHW) to [0, 1] as a tensor (`"pt"`), an NHWC array (`"np"`) or PIL images."""
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image

    # --- Paper figures. ---

    @torch.no_grad()
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
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive integer, got {every!r}.")
        x_t, pred_x0, timesteps = [], [], []

        def keep_snapshot(pipe: "DDPMPaperPipeline", i: int, t: torch.Tensor, tensors: dict) -> dict:
            if (i + 1) % every == 0 or i + 1 == num_inference_steps:
                x_t.append(self.postprocess(tensors["latents"], "np"))
                pred_x0.append(self.postprocess(tensors["pred_original_sample"], "np"))
                timesteps.append(int(t))
            return {}

        images = self(
            batch_size=batch_size,
            generator=generator,
            num_inference_steps=num_inference_steps,
            output_type="np",
            latents=latents,
            callback_on_step_end=keep_snapshot,
            callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
        ).images
        return ProgressiveGenerationOutput(
            images=images, x_t=np.stack(x_t), pred_original_sample=np.stack(pred_x0), timesteps=timesteps
        )
