"""ddpm-plugin: the DDPM paper's recipe (Ho, Jain, Abbeel 2020) as Hugging Face diffusers components.

Public names are imported lazily so that `ddpm_plugin.export.onnx_pipeline` runs where torch cannot be
imported, and so that the `ddpm` command starts quickly.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": "ddpm_plugin.presets",
    "Preset": "ddpm_plugin.presets",
    "PaperUNet2DModel": "ddpm_plugin.presets",
    "get_preset": "ddpm_plugin.presets",
    "paper_scheduler": "ddpm_plugin.scheduler",
    "DDPMPaperPipeline": "ddpm_plugin.pipelines.pipeline_ddpm_paper",
    "ProgressiveGenerationOutput": "ddpm_plugin.pipelines.pipeline_ddpm_paper",
    "GaussianDiffusion": "ddpm_plugin.pipelines.gaussian_diffusion",
    "make_grid": "ddpm_plugin.images",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
