"""The pipelines shipped inside the package: a 28x28 MNIST model, the default of `ddpm sample`, `ddpm demo`,
`ddpm evaluate` and `ddpm export`, and the small 8x8 digits model that keeps the tests fast. Each folder holds EMA
weights (safetensors), its validated ONNX export in `onnx/`, the pipeline's own code (so that
`custom_pipeline="pipeline_ddpm_paper"` loads it offline) and the settings of the run that trained it.

From Python:

```py
>>> from ddpm_plugin import DDPMPaperPipeline
>>> from ddpm_plugin.bundled import model_path
>>> pipe = DDPMPaperPipeline.from_pretrained(model_path("digits"))
```

On the command line every subcommand's `--model` takes a bundled model's name (`mnist`, `digits`), a pipeline
folder, a `ddpm train` run folder (its `pipeline/`) or an ONNX export folder ([`resolve_model`]).
"""

from __future__ import annotations

import os
from pathlib import Path

MNIST_MODEL = Path(__file__).parent / "ddpm-mnist"
DIGITS_MODEL = Path(__file__).parent / "ddpm-digits"
BUNDLED_MODELS = {"mnist": MNIST_MODEL, "digits": DIGITS_MODEL}
DEFAULT_MODEL_NAME = "mnist"
BUNDLED_MODEL = BUNDLED_MODELS[DEFAULT_MODEL_NAME]  # the default
RUN_PIPELINE = "pipeline"  # where a `ddpm train` run folder keeps its pipeline
MODEL_FORMS = "a pipeline folder, a `ddpm train` run folder, an ONNX export folder, or a bundled model name " + (
    " or ".join(repr(name) for name in BUNDLED_MODELS)
)


def model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """The folder of the bundled model `name` (`"mnist"` or `"digits"`), ready for `from_pretrained`."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"`name` must be one of {list(BUNDLED_MODELS)}, got {name!r}.")
    folder = BUNDLED_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the bundled model {name!r} is missing from {folder}; reinstall ddpm-plugin.")
    return folder


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The folder `--model` names, for every subcommand: the default bundled model when `model` is None; a bundled
    model's folder for its name (`"mnist"`, `"digits"`) where no such path exists; a training run folder's
    `pipeline/`; else `model` itself (a pipeline folder or an ONNX export). `FileNotFoundError` when it does not
    exist, naming the forms it may take."""
    if model is None:
        return model_path()
    path = Path(model)
    if not path.exists():
        if str(model) in BUNDLED_MODELS:
            return model_path(str(model))
        raise FileNotFoundError(f"--model {model}: no such folder; give {MODEL_FORMS}.")
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model} is a file; give {MODEL_FORMS}.")
    if not (path / "model_index.json").is_file() and (path / RUN_PIPELINE / "model_index.json").is_file():
        return path / RUN_PIPELINE
    return path
