"""The `ddpm` command: each subcommand module turns flags into calls to library functions.

A subcommand module defines `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed `argparse.Namespace` and returning an exit code. Heavy imports stay inside `func`, so a
subcommand whose optional dependencies are not installed fails with the extra to install, not a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from importlib import import_module

SUBCOMMANDS = ("info", "sample", "demo", "train", "push", "export", "evaluate")

# The extra that installs everything a subcommand needs; other subcommands need the module's own extra.
COMMAND_EXTRAS = {"train": "train", "export": "onnx", "demo": "demo", "evaluate": "eval"}
# Optional top-level modules -> the `ddpm-plugin[...]` extra that installs them.
MODULE_EXTRAS = {
    "torch": "torch",
    "accelerate": "train",
    "tensorboard": "train",
    "sklearn": "train",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "gradio": "demo",
    "torchmetrics": "eval",
    "matplotlib": "eval",
    "datasets": "datasets",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from ddpm_plugin import __version__

    parser = argparse.ArgumentParser(
        prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) with diffusers.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ddpm-plugin {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter),
    )
    for name in SUBCOMMANDS:
        import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def missing_extra_message(command: str, error: ModuleNotFoundError) -> str | None:
    """'pip install ...' advice when `error` is an optional dependency that is not installed, else None."""
    module = (error.name or "").split(".")[0]
    if module not in MODULE_EXTRAS:
        return None
    extra = COMMAND_EXTRAS.get(command, MODULE_EXTRAS[module])
    return f"`ddpm {command}` needs `{module}`, which is not installed: pip install \"ddpm-plugin[{extra}]\""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as error:
        message = missing_extra_message(args.command, error)
        if message is None:
            raise
        print(f"ddpm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"ddpm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
