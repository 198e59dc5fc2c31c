"""`ddpm train`: train a preset with the paper's recipe (`accelerate launch -m ddpm_plugin.training` takes the
same flags). Every `TrainingConfig` field is a flag, with the field's comment as its help."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from dataclasses import MISSING, fields


def _field_help(config_class: type) -> dict[str, str]:
    """The trailing comment of each field in the class source: the one place its meaning and unit are written."""
    source = inspect.getsource(config_class)
    return dict(re.findall(r"^\s+(\w+): [^\n]*?  # ([^\n]*)$", source, flags=re.MULTILINE))


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-case` flag per `TrainingConfig` field, typed as the field; recipe fields default to the preset."""
    from ddpm_plugin.training_config import RECIPE_FIELDS, TrainingConfig

    hints = typing.get_type_hints(TrainingConfig)
    helps = _field_help(TrainingConfig)
    for field in fields(TrainingConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind  # X | None -> X
        default = field.default if field.default is not MISSING else None
        text = helps.get(field.name, "") + (" (default: the preset's)" if field.name in RECIPE_FIELDS else "")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(base) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(base), default=default, help=text)
        else:
            parser.add_argument(flag, type=base, default=default, help=text)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a preset with the paper's recipe (Accelerate)",
        description="Train with the DDPM paper's recipe. Writes OUTPUT/checkpoints, OUTPUT/tensorboard, "
                    "OUTPUT/samples and OUTPUT/pipeline. For several processes or GPUs use "
                    "`accelerate launch -m ddpm_plugin.training` with the same flags.",
    )
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.training import NonFiniteLossError, config_from_args, train

    try:
        result = train(config_from_args(args))
    except NonFiniteLossError as error:
        print(f"ddpm train: error: {error}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:  # one line per run, not per process
        print(f"trained {result.step} steps (loss {result.loss:.4f}); pipeline saved to {result.pipeline_dir}")
    return 0
