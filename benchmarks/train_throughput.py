"""Images per second of one training step: ddpm-plugin's step against a plain loop of stock diffusers parts.

Stock: `UNet2DModel` (NCHW), `DDPMScheduler.add_noise`, `torch.optim.AdamW` (its CPU default, a per-tensor
loop), `diffusers.training_utils.EMAModel`, and `loss.item()` every step, as diffusers' `train_unconditional.py`
does. Ours: the loss of `ddpm_plugin.training` (float64-coefficient `q_sample`), the preset's default memory layout
(`TrainingConfig.for_device`: NCHW on CPU), fused Adam, the foreach EMA, no
host synchronisation; in fp32 (the default of `ddpm train`), under bf16 autocast (`--mixed-precision bf16`; AVX512-BF16
CPUs run bf16 convolutions natively) and with the forward compiled by `torch.compile` (`--compile`). Both loops clip
the global gradient norm to 1.0, start from the same weights and see the same batch sizes. Steps of all loops
alternate, so CPU contention hits them alike; the median step time is reported. A compiled loop's compile time (its
first step less a median step, in a fresh inductor cache: what a first `ddpm train --compile` pays) is reported apart.

    python benchmarks/train_throughput.py                 # digits (batch 128) and cifar10 (batch 32)
    python benchmarks/train_throughput.py --presets digits --variants fp32 compile compile-bf16 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ddpm_plugin.ema import ExponentialMovingAverage
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.presets import PaperUNet2DModel, get_preset
from ddpm_plugin.scheduler import paper_scheduler
from ddpm_plugin.training import TrainingConfig, build_optimizer, training_loss

BATCH_SIZES = {"digits": 128, "cifar10": 32}  # cifar10's 128 would take minutes per step on a CPU
# Our loops: the name shown -> (`mixed_precision`, `compile`) of `TrainingConfig`.
VARIANTS = {"fp32": ("no", False), "bf16": ("bf16", False), "compile": ("no", True), "compile-bf16": ("bf16", True)}
DEFAULT_VARIANTS = {"digits": ["fp32", "bf16", "compile-bf16"], "cifar10": ["fp32", "bf16"]}  # ~6 min here


def stock_step(preset: str, batch: int) -> Callable[[], None]:
    """One step of a plain loop of stock diffusers parts."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    unet = PaperUNet2DModel.from_preset(preset).train()
    scheduler = paper_scheduler(preset)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(unet.parameters(), decay=0.9999, model_cls=UNet2DModel, model_config=unet.config)
    x_start = example_batch(preset, batch)

    def step() -> None:
        noise = torch.randn_like(x_start)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        loss = F.mse_loss(unet(scheduler.add_noise(x_start, noise, t), t).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        loss.item()  # the example logs the loss every step

    return step


def our_step(preset: str, batch: int, mixed_precision: str, compile: bool) -> Callable[[], None]:
    """One step of `ddpm_plugin.training`'s loop (without Accelerate's wrapping, a no-op on one process)."""
    torch.manual_seed(0)
    config = TrainingConfig(preset=preset, mixed_precision=mixed_precision, compile=compile).resolve().for_device("cpu")
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    unet = PaperUNet2DModel.from_preset(preset).train().to(memory_format=layout)
    optimizer = build_optimizer(unet, config)
    ema = ExponentialMovingAverage(unet.parameters(), config.ema_decay)
    diffusion = GaussianDiffusion.from_config(paper_scheduler(preset).config)
    x_start = example_batch(preset, batch).contiguous(memory_format=layout)
    forward = torch.compile(unet, dynamic=False) if config.compile else unet  # as `training.train` does
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")

    def step() -> None:
        with autocast:
            loss = training_loss(forward, diffusion, x_start, config.random_flip)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet.parameters())

    return step


def example_batch(preset: str, batch: int) -> torch.Tensor:
    spec = get_preset(preset)
    return torch.rand(batch, spec.channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time of each step function, run in alternation, and the wall time of each one's first step."""
    first = {name: timed(step) for name, step in steps.items()}
    for step in steps.values():
        for _ in range(warmup - 1):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(values) for name, values in times.items()}, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["digits", "cifar10"], help="presets to time")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="our loops to time beside the stock one (default: fp32, bf16 and compile-bf16 for digits; fp32 "
                             "and bf16 for cifar10, whose compilation takes many minutes here)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 12 digits, 2 cifar10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per loop first (the first compiles)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # diffusers' `is_torch_version` is an lru_cache'd pure function: dynamo's note on tracing through it is noise here.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    cold_cache = tempfile.TemporaryDirectory(prefix="inductor-")  # removed at exit
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache.name  # time the compilation a first run pays

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"device: cpu ({os.cpu_count()} cores, load average {load} over 1/5/15 min), threads: {args.threads}, "
          f"torch {torch.__version__}; median of alternating steps, images/s (ratio to the stock loop)\n")
    chosen = {preset: args.variants or DEFAULT_VARIANTS.get(preset, ["fp32", "bf16"]) for preset in args.presets}
    columns = [name for name in VARIANTS if any(name in variants for variants in chosen.values())]
    rows, compile_rows = [], []
    for preset, variants in chosen.items():
        batch = BATCH_SIZES.get(preset, get_preset(preset).batch_size)
        steps = {"stock": stock_step(preset, batch)}
        steps.update({name: our_step(preset, batch, *VARIANTS[name]) for name in variants})
        repeats = args.steps or (12 if get_preset(preset).image_size <= 8 else 2)
        seconds, first = measure(steps, repeats, max(1, args.warmup))
        speed = {name: batch / value for name, value in seconds.items()}
        cells = [f"{speed[name]:.1f} ({speed[name] / speed['stock']:.2f}x)" if name in speed else "-" for name in columns]
        rows.append(f"| {preset} | {batch} | {speed['stock']:.1f} | " + " | ".join(cells) + " |")
        compile_rows += [f"| {preset} | {name} | {first[name] - seconds[name]:.0f} |" for name in variants if VARIANTS[name][1]]
    print("| preset | batch | stock diffusers loop | " + " | ".join(f"ours {name}" for name in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    print("\n".join(rows))
    if compile_rows:
        print("\n| preset | compiled loop | compile time, cold cache (s) |\n|---|---|---|")
        print("\n".join(compile_rows))


if __name__ == "__main__":
    main()
