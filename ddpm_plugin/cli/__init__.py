"""The `ddpm` command: each subcommand module turns flags into calls to library functions.

A subcommand module defines `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed `argparse.Namespace` and returning an exit code. Heavy imports stay inside `func`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

SUBCOMMANDS = ("info", "sample", "demo", "train", "push", "export", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) with diffusers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"ddpm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
