"""`ddpm info`: the presets with their parameter counts and recipes, the installed versions, and the engine
`ddpm sample` would pick for a model on this machine."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from .arguments import MODEL_HELP, positive

PACKAGES = ("ddpm-plugin", "diffusers", "torch", "accelerate", "safetensors", "onnx", "onnxruntime-gpu",
            "onnxruntime", "openvino", "gradio", "huggingface_hub")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="list presets, parameter counts, versions and the engine choice")
    parser.add_argument("--no-count", action="store_true", help="skip building each network to count parameters")
    parser.add_argument("--model", help=f"the model whose engine choice to show: {MODEL_HELP}")
    parser.add_argument("--batch-size", type=positive, default=1, help="the batch size the engine choice weighs")
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
    print_engine_choice(args.model, args.batch_size)
    return 0


def print_engine_choice(model: str | None, batch_size: int) -> None:
    """What `ddpm sample` would run `model` on at `batch_size` here, and why (no engine is imported)."""
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.export.engine_choice import Capabilities, choose_engine, machine_words

    capabilities = Capabilities.detect()
    print()
    print(f"CPU: {machine_words(capabilities)}")
    choice = choose_engine(resolve_model(model), batch_size, capabilities=capabilities)
    print(f"would sample with: {choice.backend} {choice.precision}, {choice.num_threads} threads — {choice.reason}")
