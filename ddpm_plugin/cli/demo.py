"""`ddpm demo`: serve the Gradio demo on one or more pipeline folders."""

from __future__ import annotations

import argparse

from ddpm_plugin.demo.backends import CONCURRENCY_LIMIT, MAX_IMAGES, QUEUE_SIZE

from .arguments import MODEL_HELP, port, positive


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="serve the interactive Gradio demo in a browser")
    parser.add_argument("--model", action="append", metavar="MODEL",
                        help=f"model to offer, {MODEL_HELP}; repeat for several")
    parser.add_argument("--host", default=None,
                        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=port, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--max-images", type=positive, default=MAX_IMAGES,
                        help="most images one request may ask for (default: %(default)s)")
    parser.add_argument("--concurrency", type=positive, default=CONCURRENCY_LIMIT,
                        help="requests sampled at the same time (default: %(default)s)")
    parser.add_argument("--queue-size", type=positive, default=QUEUE_SIZE,
                        help="requests that may wait in the queue (default: %(default)s)")
    parser.add_argument("--threads", type=positive, default=None,
                        help="threads per request (default: CPU cores / concurrency)")
    parser.add_argument("--no-onnx", action="store_true", help="offer only the PyTorch backend")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.demo.app import launch

    launch(
        [resolve_model(model) for model in args.model or [None]], host=args.host, port=args.port, max_images=args.max_images,
        concurrency=args.concurrency, queue_size=args.queue_size, num_threads=args.threads, onnx=not args.no_onnx,
    )
    return 0
