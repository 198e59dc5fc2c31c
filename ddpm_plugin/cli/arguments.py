"""Argument types for the `ddpm` parsers: a bad value stops at parsing, before any work, with argparse's one-line
message that names the flag (`ddpm demo: error: argument --port: must be a whole number in 0..65535, got '70000'`)."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from ddpm_plugin.bundled import BUNDLED_MODELS, DEFAULT_MODEL_NAME
from ddpm_plugin.demo.options import whole_number  # defined beside the demo's flags: the demo imports no CLI module
# The help of every subcommand's --model, with the default the code uses (`bundled.resolve_model(None)`).
MODEL_HELP = (f"a pipeline folder, a `ddpm train` run folder, an ONNX export folder or a bundled model "
              f"({', '.join(BUNDLED_MODELS)}) (default: the bundled {DEFAULT_MODEL_NAME} model)")


def finite_float(text: str) -> float:
    """An argparse type: a finite number (`inf`, `-inf` and `nan` are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def checked(check: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse type: the string itself once `check(text)` has passed; its `ValueError`/`OSError` becomes the
    parser's message."""

    def parse(text: str) -> str:
        try:
            check(text)
        except (ValueError, OSError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return parse


positive = whole_number(1)
