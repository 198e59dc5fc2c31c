"""`ddpm push`: publish a trained pipeline folder to the Hugging Face Hub in one commit."""

from __future__ import annotations

import argparse

from .arguments import MODEL_HELP, checked, positive


def _grid(path: str) -> None:
    from ddpm_plugin.hub import check_grid

    check_grid(path)


def _report(path: str) -> None:
    from ddpm_plugin.model_card import read_evaluation_report

    read_evaluation_report(path)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push", help="publish a pipeline folder to the Hugging Face Hub (card, sample grid, ONNX export)",
        description="Build the Hub-ready folder of a pipeline (loadable layout, pipeline code, ONNX export, sample "
        "grid, model card) and upload it in one commit. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP.partition(" (default")[0])
    parser.add_argument("--repo-id", required=True, help="Hub repository, USER/NAME or ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing; default: main)")
    parser.add_argument("--commit-message", help="summary of the commit")
    parser.add_argument("--report", type=checked(_report),
                        help="evaluation report JSON (default: MODEL/evaluation/report.json if present)")
    parser.add_argument("--grid", type=checked(_grid), help="PNG to publish as the sample grid (default: sample 16 images)")
    parser.add_argument("--grid-steps", type=positive, default=1000, help="denoising steps of the sampled grid")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    parser.add_argument("--output", help="also keep the Hub-ready folder here (must be empty or absent)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import tempfile
    from pathlib import Path

    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.hub import build_hub_folder, find_pipeline_folder, pipeline_files, push_folder, skipped_files, upload_plan

    args.model = resolve_model(args.model)
    skipped = skipped_files(args.model, pipeline_files(args.model))
    if skipped:
        print(f"skipped (not part of the loadable pipeline): {', '.join(skipped)}")
    sampler = None
    if args.grid is None:  # the model's ONNX export when it has one, as `ddpm sample` samples
        from ddpm_plugin.export.sampler import open_sampler

        sampler = open_sampler(find_pipeline_folder(args.model), num_inference_steps=args.grid_steps)
    with tempfile.TemporaryDirectory(prefix="ddpm-push-") as staging:
        folder = Path(args.output) if args.output else Path(staging) / "repo"
        build_hub_folder(args.model, folder, args.repo_id, report=args.report, grid=args.grid, sampler=sampler,
                         announce=lambda line: print(line, file=sys.stderr))
        plan = upload_plan(folder)
        if args.dry_run:
            print(f"dry run: would upload {len(plan)} files to {args.repo_id}"
                  f"{'@' + args.revision if args.revision else ''}:")
            print("| file | bytes |\n|---|---:|")
            for path, size in plan:
                print(f"| {path} | {size:,} |")
            print(f"| total | {sum(size for _, size in plan):,} |")
            return 0
        result = push_folder(folder, args.repo_id, private=args.private, revision=args.revision,
                             commit_message=args.commit_message)
    if result.deleted:
        print(f"deleted {len(result.deleted)} files of an earlier push: {', '.join(result.deleted)}")
    print(f"published {len(result.files)} files in commit {result.commit_oid[:7]}: {result.url}")
    return 0
