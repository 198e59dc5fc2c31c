"""Loading a pipeline folder for sampling with a chosen sampler."""

from __future__ import annotations

import os
from typing import Literal

from diffusers import DDIMScheduler

from .pipelines.pipeline_ddpm_paper import DDPMPaperPipeline

Sampler = Literal["ddpm", "ddim"]


def load_pipeline(model: str | os.PathLike, scheduler: Sampler = "ddpm") -> DDPMPaperPipeline:
    """`DDPMPaperPipeline` from a folder, with its paper `DDPMScheduler` or a `DDIMScheduler` of the same
    training schedule."""
    if not os.path.isdir(model) or not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(f"{model} is not a pipeline folder (no model_index.json).")
    pipe = DDPMPaperPipeline.from_pretrained(model)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "ddpm":
        raise ValueError(f"`scheduler` must be 'ddpm' or 'ddim', got {scheduler!r}.")
    pipe.set_progress_bar_config(leave=False)
    return pipe
