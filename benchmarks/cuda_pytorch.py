"""Sampling on a CUDA GPU in PyTorch: `DDPMPaperPipeline` against stock diffusers `DDPMPipeline`, per precision.

GPU only (without a CUDA device it says so and runs nothing). On the paper's cifar10 UNet (random weights, the
architecture is what costs) at each batch size it times, interleaved (ABAB...), ms per denoising step of:

- stock `DDPMPipeline` in float32, under bf16 autocast, and with float16 weights (diffusers' `torch_dtype`
  convention: there the noise and the scheduler's step run in float16 too);
- `DDPMPaperPipeline` in float32, under bf16 autocast, under bf16 autocast with float32 for t < 10
  (`float32_below_t=10`, time-step-aware precision), with bfloat16 weights (x_t and the step stay float32), and
  bfloat16 weights in channels-last memory.

It also checks, on the GPU, what the CPU tests check: `DDPMPaperPipeline` in float32 reproduces stock
`DDPMPipeline` from the same CUDA generator, and the bound (bits/dim of the bundled digits model, all 1000 terms,
x_t drawn on the CPU so every device sees the same noise) matches the CPU's: with cuDNN's default TF32
convolutions and with TF32 off.

    python benchmarks/cuda_pytorch.py                                  # batch 8 and 128, 50 steps
    python benchmarks/cuda_pytorch.py --batch-sizes 8 --steps 20 --repeats 5
    python benchmarks/cuda_pytorch.py --compile --only paper-bf16-weights,paper-fp32+compile,paper-bf16-weights+compile
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

BF16 = torch.bfloat16


def autocast_bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=BF16)


def backends(
    unet: Any, scheduler: Any, compile: bool = False
) -> dict[str, tuple[Any, Callable[[], contextlib.AbstractContextManager], dict]]:
    """name -> (pipeline, context factory, extra call arguments); with `compile`, also `DDPMPaperPipeline` with
    its UNet compiled by `torch.compile(mode="reduce-overhead")` (CUDA graphs), in float32 and bf16 weights."""
    import copy

    from diffusers import DDPMPipeline

    from ddpm_plugin import DDPMPaperPipeline

    def paper(weights: Any) -> Any:
        return DDPMPaperPipeline(unet=weights, scheduler=copy.deepcopy(scheduler))

    fp32 = unet.to("cuda")
    bf16 = copy.deepcopy(unet).to("cuda", BF16)
    bf16_channels_last = copy.deepcopy(bf16).to(memory_format=torch.channels_last)
    fp16 = copy.deepcopy(unet).to("cuda", torch.float16)
    none = contextlib.nullcontext
    cases = {
        "diffusers-fp32": (DDPMPipeline(unet=fp32, scheduler=copy.deepcopy(scheduler)), none, {}),
        "diffusers-bf16-autocast": (DDPMPipeline(unet=fp32, scheduler=copy.deepcopy(scheduler)), autocast_bf16, {}),
        "diffusers-fp16-weights": (DDPMPipeline(unet=fp16, scheduler=copy.deepcopy(scheduler)), none, {}),
        "paper-fp32": (paper(fp32), none, {}),
        "paper-bf16-autocast": (paper(fp32), autocast_bf16, {}),
        "paper-bf16-autocast+fp32-below-t10": (paper(fp32), autocast_bf16, {"float32_below_t": 10}),
        "paper-bf16-weights": (paper(bf16), none, {}),
        "paper-bf16-weights-channels-last": (paper(bf16_channels_last), none, {}),
    }
    if compile:
        for name, weights in (("paper-fp32+compile", fp32), ("paper-bf16-weights+compile", bf16)):
            compiled = copy.deepcopy(weights)
            compiled.forward = torch.compile(compiled.forward, mode="reduce-overhead", fullgraph=True)
            cases[name] = (paper(compiled), none, {})
    for pipe, _, _ in cases.values():
        pipe.set_progress_bar_config(disable=True)
    return cases


def time_backends(cases: dict, batch_size: int, steps: int, repeats: int) -> dict[str, list[float]]:
    """ms per step of every backend, `repeats` runs each, interleaved after one warm-up run each."""
    def run(name: str, num_steps: int) -> float:
        pipe, context, extra = cases[name]
        torch.cuda.synchronize()
        started = time.perf_counter()
        with context(), torch.no_grad():
            pipe(batch_size=batch_size, num_inference_steps=num_steps, output_type="np",
                 generator=torch.Generator("cuda").manual_seed(0), **extra)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000 / num_steps

    for name in cases:
        run(name, 2)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name in cases:
            times[name].append(run(name, steps))
    return times


def parity(cases: dict) -> float:
    """max |x_paper - x_stock| (pixels in [0, 1]) of float32 samples from the same CUDA generator."""
    images = []
    for name in ("diffusers-fp32", "paper-fp32"):
        pipe = cases[name][0]
        with torch.no_grad():
            images.append(pipe(batch_size=4, num_inference_steps=20, output_type="np",
                               generator=torch.Generator("cuda").manual_seed(1)).images)
    return float(np.abs(images[0] - images[1]).max())


def bound_on_devices(num_images: int) -> dict[str, float]:
    """Mean bits/dim of `num_images` digits under the bundled digits model on CPU and CUDA (TF32 on / off)."""
    from ddpm_plugin import DDPMPaperPipeline
    from ddpm_plugin.bundled import DIGITS_MODEL
    from ddpm_plugin.evaluation import dataset_images

    images, _ = dataset_images("digits", (1, 8, 8), num_images, seed=0)
    pipe = DDPMPaperPipeline.from_pretrained(DIGITS_MODEL)
    pipe.set_progress_bar_config(disable=True)
    result = {}
    for name, device, tf32 in (("cpu", "cpu", False), ("cuda, TF32 on", "cuda", True), ("cuda, TF32 off", "cuda", False)):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        pipe.to(device)
        bound = pipe.bits_per_dim(images, batch_size=1000, generator=torch.Generator("cpu").manual_seed(0))
        result[name] = float(bound.total_bpd.mean())
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's defaults
    torch.backends.cuda.matmul.allow_tf32 = False
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-sizes", default="8,128")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bound-images", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="add torch.compile(mode='reduce-overhead') rows")
    parser.add_argument("--only", default=None, help="comma-separated backends to time (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA device found: torch {torch.__version__} sees no GPU here, so nothing was run (this benchmark needs an NVIDIA GPU).")
        return

    from ddpm_plugin.presets import PaperUNet2DModel
    from ddpm_plugin.scheduler import paper_scheduler

    torch.manual_seed(0)
    unet = PaperUNet2DModel.from_preset(args.preset).eval()
    scheduler = paper_scheduler(args.preset)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, preset {args.preset} "
          f"({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters), {args.steps} steps per run, "
          f"{args.repeats} runs per backend, interleaved; ms per step")
    cases = backends(unet, scheduler, args.compile)
    print(f"parity: max |paper fp32 - diffusers fp32| over 4 samples, 20 steps, same CUDA generator: {parity(cases):.3g}")
    if args.only:
        cases = {name: case for name, case in cases.items() if name in args.only.split(",") or name.startswith("diffusers-")}
    for batch_size in map(int, args.batch_sizes.split(",")):
        times = time_backends(cases, batch_size, args.steps, args.repeats)
        base = {name: statistics.median(times[name]) for name in ("diffusers-fp32", "diffusers-bf16-autocast")}
        print(f"\n| batch | backend | ms/step min / median / max | spread | vs diffusers fp32 | vs diffusers bf16 autocast |")
        print("|---:|---|---:|---:|---:|---:|")
        for name, runs in times.items():
            median = statistics.median(runs)
            spread = (max(runs) - min(runs)) / median
            print(f"| {batch_size} | {name} | {min(runs):.2f} / {median:.2f} / {max(runs):.2f} | {spread:.0%}"
                  f"{' NOISY' if spread > 0.10 else ''} | {base['diffusers-fp32'] / median:.2f}x | "
                  f"{base['diffusers-bf16-autocast'] / median:.2f}x |")
    if not args.bound_images:
        return
    bound = bound_on_devices(args.bound_images)
    cpu = bound["cpu"]
    print(f"\nbits/dim of {args.bound_images} digits, bundled digits model, x_t drawn on the CPU: " + "; ".join(
        f"{name} {value:.6f} ({value / cpu - 1:+.2e})" for name, value in bound.items()))


if __name__ == "__main__":
    main()
