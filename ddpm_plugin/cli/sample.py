"""`ddpm sample`: images from a saved pipeline, as a PNG grid or as resumable `.npz` shards for FID."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm_plugin.sampling import MAX_SEED
from ddpm_plugin.vocabulary import BACKENDS, PRECISIONS, SAMPLER_NAMES, SAMPLERS, SAMPLERS_WITHOUT_ETA

from .arguments import MODEL_HELP, finite_float, whole_number

MAX_SCALE = 32  # the grid's upscaling: 8x8 digits become 256-pixel tiles


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample", help="sample images from a pipeline folder into a PNG grid or .npz shards",
        description="Sample images into a grid picture (--output) or into resumable .npz shards with a manifest "
                    "(--output-dir; run it under `accelerate launch -m ddpm_plugin.cli sample ...` to use several "
                    "processes). Image i depends only on --seed and i.",
    )
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--num-images", type=int, default=16, help="number of images")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (and per shard)")
    parser.add_argument("--steps", type=int, default=1000, help="denoising steps (1..1000)")
    parser.add_argument("--seed", type=int, default=0, help=f"random seed (0..{MAX_SEED})")
    parser.add_argument("--scheduler", "--sampler", dest="scheduler", choices=SAMPLERS, default="ddpm",
                        help="sampler: ddpm (the paper's ancestral sampling), ddim, or dpmsolver++ (second-order "
                             "DPM-Solver++, deterministic, for few steps)")
    parser.add_argument("--eta", type=finite_float, default=0.0, help="DDIM eta (0 = deterministic; DDIM only)")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="auto (the fastest for this CPU and batch size, by the engine table; `ddpm info` says "
                             "which), onnxruntime, openvino (the export on OpenVINO) or pytorch")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="auto (the engine table's), fp32 or bf16 (openvino and pytorch; float32 for the last "
                             "steps)")
    outputs = parser.add_mutually_exclusive_group()
    outputs.add_argument("--output", help="picture of the grid to write (default: grid.png)")
    outputs.add_argument("--output-dir", help="folder of .npz shards and manifest.json (resumes a run there)")
    parser.add_argument("--scale", type=whole_number(1, MAX_SCALE), default=4,
                        help=f"nearest-neighbour upscaling of the grid, 1..{MAX_SCALE}")
    parser.set_defaults(func=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag checked before any model is loaded, so a mistake costs nothing."""
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}.")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}.")
    if args.eta < 0:
        raise ValueError(f"--eta must be a finite number >= 0, got {args.eta}.")
    if args.eta != 0 and args.scheduler in SAMPLERS_WITHOUT_ETA:
        raise ValueError(f"--eta {args.eta} is DDIM's stochasticity; the {SAMPLER_NAMES[args.scheduler]} sampler has none: add --scheduler ddim or drop --eta.")
    if args.output_dir is None:
        check_picture_path(Path(args.output or "grid.png"))


def auto_to_none(value: str) -> str | None:
    return None if value == "auto" else value


def check_picture_path(path: Path) -> None:
    from PIL import Image

    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file such as {path / 'grid.png'} (or use --output-dir for shards).")
    if not path.parent.is_dir():
        raise ValueError(f"--output {path}: the folder {path.parent} does not exist.")
    writable = sorted(ext for ext, kind in Image.registered_extensions().items() if kind in Image.SAVE)
    if path.suffix.lower() not in writable:
        raise ValueError(f"--output {path}: unknown picture type {path.suffix or '(none)'!r}; use .png (or {', '.join(writable[:6])}, ...).")


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.bundled import resolve_model

    check_arguments(args)
    model = resolve_model(args.model)
    from ddpm_plugin.export.engine_choice import choose_engine
    from ddpm_plugin.export.sampler import open_sampler

    choice = choose_engine(model, min(args.batch_size, args.num_images), auto_to_none(args.backend),
                           auto_to_none(args.precision))
    print(f"ddpm sample: {choice.backend} {choice.precision}, {choice.num_threads} threads: {choice.reason}",
          file=sys.stderr)
    options = dict(num_inference_steps=args.steps, scheduler=args.scheduler, eta=args.eta, seed=args.seed,
                   backend=choice.backend, precision=None if choice.backend == "onnxruntime" else choice.precision)

    if args.output_dir is not None:
        import os

        from ddpm_plugin.sample_shards import process_state, sample_to_shards

        state = process_state()
        # accelerate launch sets OMP_NUM_THREADS per process
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or choice.num_threads
        sampler = open_sampler(model, device=str(getattr(state, "device", "cpu")), num_threads=threads,
                               progress_bar=state.is_main_process, **options)
        manifest = sample_to_shards(sampler, args.output_dir, args.num_images, args.batch_size, state)
        if not state.is_main_process:
            return 0
        rate = manifest["images_per_second"]
        print(f"{args.output_dir}: {args.num_images} images in {len(manifest['shards'])} shards "
              f"({manifest['shards_reused']} kept from an earlier run; {manifest['num_processes']} processes"
              + (f", {rate:.3g} images/s)" if rate else ")"))
        return 0
    import numpy as np

    from ddpm_plugin.images import make_grid

    output = args.output or "grid.png"
    sampler = open_sampler(model, num_threads=choice.num_threads, **options)
    images = np.concatenate([sampler(start, min(args.batch_size, args.num_images - start))
                             for start in range(0, args.num_images, args.batch_size)])
    make_grid(images, scale=args.scale).save(output)
    print(f"wrote {args.num_images} images to {output} ({sampler.backend})")
    return 0
