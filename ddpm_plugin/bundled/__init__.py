"""The small digits pipeline shipped inside the package, the default model of `ddpm sample` and the demo."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MODEL = Path(__file__).parent / "ddpm-digits"


def resolve_model(model: str | os.PathLike | None) -> Path:
    """`model` as a path, or the bundled digits pipeline when `model` is None."""
    if model is not None:
        return Path(model)
    if not (BUNDLED_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled digits model is missing from {BUNDLED_MODEL}; pass --model DIR or reinstall ddpm-plugin."
        )
    return BUNDLED_MODEL
