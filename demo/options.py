"""The demo's command-line flags, defined once: `ddpm demo` (`ddpm_plugin.cli.demo`) adds them to its
sub-parser and `python app.py` (the Space entry point, which imports no CLI module) to its own parser.

Also the argument type [`whole_number`] that every `ddpm` parser uses: it lives here, the lowest layer whose
parsers need it, so that the CLI imports the demo and never the other way.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

from ddpm_plugin.demo.backends import CONCURRENCY_LIMIT, MAX_IMAGES, QUEUE_SIZE

MAX_PORT = 65535


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in `low..high` (no upper bound when `high` is None)."""
    allowed = f"in {low}..{high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {allowed}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser, model_help: str) -> argparse.ArgumentParser:
    """Add the demo's flags to `parser`; `model_help` says what `--model` takes. Returns `parser`."""
    positive = whole_number(1)
    parser.add_argument("--model", action="append", metavar="MODEL", help=f"model to offer, {model_help}; repeat for several")
    parser.add_argument("--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=whole_number(0, MAX_PORT), default=None,
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--max-images", type=positive, default=MAX_IMAGES,
                        help="most images one request may ask for (default: %(default)s)")
    parser.add_argument("--concurrency", type=positive, default=CONCURRENCY_LIMIT,
                        help="requests sampled at the same time (default: %(default)s)")
    parser.add_argument("--queue-size", type=positive, default=QUEUE_SIZE,
                        help="requests that may wait in the queue (default: %(default)s)")
    parser.add_argument("--threads", type=positive, default=None,
                        help="threads per request (default: CPU cores / concurrency)")
    parser.add_argument("--no-onnx", action="store_true", help="offer only the PyTorch backend")
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve the demo as the parsed flags say, until interrupted."""
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.demo.app import launch

    models: list[str | os.PathLike | None] = args.model or [None]
    launch(
        [resolve_model(model) for model in models], host=args.host, port=args.port, max_images=args.max_images,
        concurrency=args.concurrency, queue_size=args.queue_size, num_threads=args.threads, onnx=not args.no_onnx,
    )
    return 0
