"""`ddpm train`: train a preset with the paper's recipe. Every `TrainingConfig` field is a flag, with the `help`
of the field's metadata as its help. For several processes or GPUs, `accelerate launch ... -m ddpm_plugin.cli
train` takes the same flags."""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
import warnings
from contextlib import contextmanager
from dataclasses import Field, fields
from typing import TYPE_CHECKING, Iterator

from .arguments import finite_float

if TYPE_CHECKING:
    from ddpm_plugin.training_config import ConfigError, TrainingConfig


def field_help(field: Field, recipe_fields: tuple[str, ...]) -> str:
    """The field's help, ending with its default unless the help already says it."""
    text = field.metadata["help"]
    if "default" in text:
        return text
    return f"{text} (default: {'the preset' if field.name in recipe_fields else field.default})"


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-case` flag per `TrainingConfig` field, typed as the field; recipe fields default to the preset."""
    from ddpm_plugin.training_config import RECIPE_FIELDS, TrainingConfig

    hints = typing.get_type_hints(TrainingConfig)
    for field in fields(TrainingConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind  # X | None -> X
        text = field_help(field, RECIPE_FIELDS)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text)
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=field.default, help=text)
        else:
            parser.add_argument(flag, type=finite_float if base is float else base, default=field.default, help=text)


def config_from_args(args: argparse.Namespace) -> "TrainingConfig":
    """A `TrainingConfig` from parsed `ddpm train` flags (those the user left out stay at their defaults)."""
    from ddpm_plugin.training_config import TrainingConfig

    return TrainingConfig(**{f.name: getattr(args, f.name) for f in fields(TrainingConfig) if hasattr(args, f.name)})


def flag_message(error: "ConfigError") -> str:
    """The error with each `config_field` written as the `--config-field` flag the user typed."""
    from ddpm_plugin.training_config import TrainingConfig

    names = {f.name for f in fields(TrainingConfig)}
    return re.sub(r"`(\w+)`", lambda m: "--" + m[1].replace("_", "-") if m[1] in names else m[0], str(error))


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings printed as `warning: MESSAGE`, without the source line, its number and the category."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a preset with the paper's recipe (Accelerate)",
        description="Train with the DDPM paper's recipe. Writes OUTPUT/checkpoints, OUTPUT/tensorboard, "
                    "OUTPUT/samples and OUTPUT/pipeline. For several processes or GPUs use "
                    "`accelerate launch ... -m ddpm_plugin.cli train` with the same flags.",
    )
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.checkpoints import CheckpointWriteError
    from ddpm_plugin.training import NonFiniteLossError, train
    from ddpm_plugin.training_config import ConfigError

    try:
        with one_line_warnings():
            result = train(config_from_args(args))
    except ConfigError as error:
        print(f"ddpm train: error: {flag_message(error)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointWriteError) as error:
        print(f"ddpm train: error: {error}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process and not result.already_finished:  # one line per run, not per process
        print(f"trained {result.step} steps (loss {result.loss:.4f}); pipeline saved to {result.pipeline_dir}")
    return 0
