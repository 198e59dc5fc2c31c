"""Pipelines of ddpm-plugin, importable as `ddpm_plugin.pipelines`.

Imports are lazy so that the torch-free ONNX sampler can import `gaussian_diffusion` without torch.
"""

from typing import Any

__all__ = ["DDPMPaperPipeline", "GaussianDiffusion", "ProgressiveGenerationOutput"]


def __getattr__(name: str) -> Any:
    if name == "GaussianDiffusion":
        from .gaussian_diffusion import GaussianDiffusion

        return GaussianDiffusion
    if name in ("DDPMPaperPipeline", "ProgressiveGenerationOutput"):
        from . import pipeline_ddpm_paper

        return getattr(pipeline_ddpm_paper, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
