"""`ddpm demo`: serve the Gradio demo on one or more pipeline folders (the flags are the demo's own)."""

from __future__ import annotations

import argparse

from ddpm_plugin.demo.options import add_arguments, run

from .arguments import MODEL_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="serve the interactive Gradio demo in a browser")
    add_arguments(parser, MODEL_HELP).set_defaults(func=run)
