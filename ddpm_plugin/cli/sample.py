"""`ddpm sample`: a PNG grid of samples from a saved pipeline."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sample", help="sample images from a pipeline folder into a PNG grid")
    parser.add_argument("--model", help="pipeline folder (default: the bundled digits model)")
    parser.add_argument("--num-images", type=int, default=16, help="number of images")
    parser.add_argument("--steps", type=int, default=1000, help="denoising steps (1..1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--scheduler", choices=("ddpm", "ddim"), default="ddpm", help="sampler")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the grid")
    parser.add_argument("--output", default="grid.png", help="PNG file to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.images import make_grid
    from ddpm_plugin.sampling import load_pipeline

    pipe = load_pipeline(resolve_model(args.model), scheduler=args.scheduler)
    images = pipe(
        batch_size=args.num_images, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed),
        eta=args.eta, output_type="np",
    ).images
    make_grid(images, scale=args.scale).save(args.output)
    print(f"wrote {args.num_images} images to {args.output}")
    return 0
