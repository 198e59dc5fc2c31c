"""The pipelines shipped inside the package: a 28x28 MNIST model, the default of `ddpm sample`, `ddpm demo` and
`ddpm export`, and the small 8x8 digits model that keeps the tests fast. Each folder holds EMA weights
(safetensors), its validated ONNX export in `onnx/`, and the settings of the run that trained it."""

from __future__ import annotations

import os
from pathlib import Path

MNIST_MODEL = Path(__file__).parent / "ddpm-mnist"
DIGITS_MODEL = Path(__file__).parent / "ddpm-digits"
BUNDLED_MODELS = {"mnist": MNIST_MODEL, "digits": DIGITS_MODEL}
BUNDLED_MODEL = MNIST_MODEL  # the default


def resolve_model(model: str | os.PathLike | None) -> Path:
    """`model` as a path; a bundled model's name (`"mnist"`, `"digits"`) where no such folder exists; the default
    bundled model when `model` is None."""
    if model is not None:
        path = Path(model)
        return BUNDLED_MODELS[str(model)] if str(model) in BUNDLED_MODELS and not path.exists() else path
    if not (BUNDLED_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from {BUNDLED_MODEL}; pass --model DIR or reinstall ddpm-plugin."
        )
    return BUNDLED_MODEL
