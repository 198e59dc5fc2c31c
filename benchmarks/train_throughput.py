"""Images per second of one training step: ddpm-plugin's step against a plain loop of stock diffusers parts.

Stock: `UNet2DModel` (NCHW), `DDPMScheduler.add_noise`, `torch.optim.AdamW` (its CPU default, a per-tensor
loop), `diffusers.training_utils.EMAModel`, and `loss.item()` every step, as diffusers' `train_unconditional.py`
does. Ours: the loss of `ddpm_plugin.training` (float64-coefficient `q_sample`), channels-last memory, fused Adam,
the foreach EMA, no host synchronisation, in fp32 and under bf16 autocast (`--mixed-precision bf16`; this
machine's CPUs have AVX512-BF16). Both clip the global gradient norm to 1.0, start from the same
weights and see the same batch sizes. Steps of the two loops alternate, so CPU contention hits both alike; the
median step time is reported.

    python benchmarks/train_throughput.py                 # digits (batch 128) and cifar10 (batch 32)
    python benchmarks/train_throughput.py --presets digits --steps 20 --threads 2 --no-bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ddpm_plugin.ema import ExponentialMovingAverage
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.presets import PaperUNet2DModel, get_preset
from ddpm_plugin.scheduler import paper_scheduler
from ddpm_plugin.training import TrainingConfig, build_optimizer, training_loss

BATCH_SIZES = {"digits": 128, "cifar10": 32}  # cifar10's 128 would take minutes per step on a CPU


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


def our_step(preset: str, batch: int, mixed_precision: str) -> Callable[[], None]:
    """One step of `ddpm_plugin.training`'s loop (without Accelerate's wrapping, a no-op on one process)."""
    torch.manual_seed(0)
    config = TrainingConfig(preset=preset).resolve()
    unet = PaperUNet2DModel.from_preset(preset).train().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(unet, config)
    ema = ExponentialMovingAverage(unet.parameters(), config.ema_decay)
    diffusion = GaussianDiffusion.from_config(paper_scheduler(preset).config)
    x_start = example_batch(preset, batch).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")

    def step() -> None:
        with autocast:
            loss = training_loss(unet, diffusion, x_start, config.random_flip)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet.parameters())

    return step


def example_batch(preset: str, batch: int) -> torch.Tensor:
    spec = get_preset(preset)
    return torch.rand(batch, spec.channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def median_step_seconds(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time of each step function, run in alternation."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["digits", "cifar10"], help="presets to time")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 12 digits, 2 cifar10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per loop first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our step under bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"device: cpu, threads: {args.threads}, torch {torch.__version__}, median of alternating steps\n")
    header = "| preset | batch | stock diffusers loop (img/s) | ours fp32 (img/s) | ours / stock |"
    rows = []
    for preset in args.presets:
        batch = BATCH_SIZES.get(preset, get_preset(preset).batch_size)
        steps = {"stock": stock_step(preset, batch), "ours": our_step(preset, batch, "no")}
        if args.bf16:
            steps["ours bf16"] = our_step(preset, batch, "bf16")
        repeats = args.steps or (12 if get_preset(preset).image_size <= 8 else 2)
        seconds = median_step_seconds(steps, repeats, args.warmup)
        speed = {name: batch / value for name, value in seconds.items()}
        row = f"| {preset} | {batch} | {speed['stock']:.1f} | {speed['ours']:.1f} | {speed['ours'] / speed['stock']:.2f}x |"
        if args.bf16:
            row += f" {speed['ours bf16']:.1f} | {speed['ours bf16'] / speed['stock']:.2f}x |"
        rows.append(row)
    if args.bf16:
        header += " ours bf16 autocast (img/s) | bf16 / stock |"
    print(header)
    print("|" + "---|" * header.count(" |"))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
