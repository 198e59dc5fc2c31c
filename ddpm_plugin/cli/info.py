"""`ddpm info`: the presets with their parameter counts and recipes, and the installed versions."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("ddpm-plugin", "diffusers", "torch", "accelerate", "safetensors", "onnx", "onnxruntime-gpu",
            "onnxruntime", "gradio", "huggingface_hub")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="list presets, parameter counts and versions")
    parser.add_argument("--no-count", action="store_true", help="skip building each network to count parameters")
    parser.set_defaults(func=run)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.presets import PRESETS

    count_parameters = not args.no_count and torch_available()
    print("| preset | image | parameters | variance | lr | batch | warmup | EMA | dropout | flips |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---|")
    for name, preset in PRESETS.items():
        if count_parameters:
            from ddpm_plugin.presets import PaperUNet2DModel

            count = PaperUNet2DModel.from_preset(name).num_parameters()
        else:
            count = preset.num_parameters
        print(
            f"| {name} | {preset.image_size}x{preset.image_size}x{preset.channels} | {count:,} | "
            f"{preset.variance_type} | {preset.learning_rate:g} | {preset.batch_size} | {preset.warmup_steps} | "
            f"{preset.ema_decay} | {preset.dropout} | {'yes' if preset.random_flip else 'no'} |"
        )
    if not args.no_count and not count_parameters:
        print("\nparameters: the presets' recorded counts (torch is not installed, so no network was built to count "
              'them: pip install "ddpm-plugin[torch]")')
    print()
    for package in PACKAGES:
        try:
            print(f"{package}: {version(package)}")
        except PackageNotFoundError:
            pass
    return 0
