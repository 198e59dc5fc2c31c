"""Training with the DDPM paper's recipe (Ho et al. 2020, Algorithm 1 and Appendix B), on Accelerate.

One loop, read top to bottom: a config, the data, the model, then a loop that draws a batch, takes one Adam
step on L_simple = E ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2, updates the EMA,
logs, checkpoints and samples. Accelerate appears only at the edges (processes, DDP, autocast, trackers).

The same file runs on one CPU, on several processes or on many GPUs; only the launch changes:

```sh
ddpm train --preset digits --output-dir runs/digits
accelerate launch --multi_gpu --num_processes 8 -m ddpm_plugin.training --preset cifar10 --output-dir runs/cifar10
```

A run writes `OUTPUT/training_config.json`, `OUTPUT/checkpoints/checkpoint-<step>/`, `OUTPUT/tensorboard/`,
`OUTPUT/samples/step-<step>.png` and, at the end, the pipeline `OUTPUT/pipeline/` (EMA weights, the raw weights
as variant `non_ema`).

Exact resume: batches are indexed out of a seeded per-epoch permutation, so the data position is a function of
the step (nothing is iterated to skip batches), and each checkpoint holds every process's RNG states.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import Checkpoint, capture_rng_state, load_checkpoint, load_latest_checkpoint, restore_rng_state, save_checkpoint
from .data import ImageDataset, load_image_dataset, to_model_range
from .ema import ExponentialMovingAverage
from .pipelines.diffusion_ops import q_sample
from .pipelines.gaussian_diffusion import GaussianDiffusion
from .presets import PaperUNet2DModel, get_preset
from .training_config import RESUMABLE_CHANGES, TrainingConfig

PERMUTATION_SEED_OFFSET = 1_000_003  # keeps the data order's generator apart from the model-init seed


@dataclass
class TrainingResult:
    """What `train` returns: the final step and loss, the trained networks, and where the run's files are."""

    step: int
    loss: float
    unet: torch.nn.Module  # the raw (non-EMA) weights
    ema_unet: torch.nn.Module  # the EMA weights, as saved in the pipeline
    pipeline_dir: Path


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


# --- Small functions the loop calls. ---


def learning_rate_at(step: int, config: TrainingConfig) -> float:
    """Linear warmup from 0 over `warmup_steps`, then constant (paper Appendix B)."""
    if config.warmup_steps == 0:
        return config.learning_rate
    return config.learning_rate * min(1.0, (step + 1) / config.warmup_steps)


def epoch_permutation(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * PERMUTATION_SEED_OFFSET + epoch)
    return torch.randperm(num_images, generator=generator)


def batch_indices(micro_step: int, *, seed: int, num_images: int, global_batch: int, rank: int, world_size: int,
                  cache: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Indices of this process's images for global micro-batch `micro_step`: each epoch is a fresh permutation
    cut into `global_batch` slices (the rest dropped), and each slice into one part per process."""
    batches_per_epoch = num_images // global_batch
    epoch, batch = divmod(micro_step, batches_per_epoch)
    cache = {} if cache is None else cache
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_permutation(seed, epoch, num_images)
    per_process = global_batch // world_size
    start = batch * global_batch + rank * per_process
    return cache[epoch][start : start + per_process]


class StepBatchSampler:
    """This process's micro-batch indices for micro-steps `start`, `start + 1`, ... (see `batch_indices`), so a
    resumed run starts at its step without iterating through the batches before it."""

    def __init__(self, start: int, **layout: int):
        self.start, self.layout = start, layout

    def __iter__(self) -> Iterator[list[int]]:
        cache: dict[int, torch.Tensor] = {}
        for micro_step in itertools.count(self.start):
            yield batch_indices(micro_step, cache=cache, **self.layout).tolist()


def stack_images(items: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W]; in-memory data sets already return the batch as one tensor (`__getitems__`)."""
    return items if isinstance(items, torch.Tensor) else torch.stack(items)


def image_batches(dataset: ImageDataset, start: int, config: TrainingConfig, global_micro_batch: int, rank: int,
                  world_size: int) -> Iterator[torch.Tensor]:
    """This process's uint8 micro-batches from micro-step `start` on, loaded by `config.num_workers` workers."""
    from torch.utils.data import DataLoader

    sampler = StepBatchSampler(start, seed=config.seed, num_images=len(dataset), global_batch=global_micro_batch,
                               rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=stack_images,
                        pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator())  # else creating the iterator would draw from the global RNG
    return iter(loader)


def training_loss(unet: torch.nn.Module, diffusion: GaussianDiffusion, x_start: torch.Tensor, random_flip: bool) -> torch.Tensor:
    """Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), loss = mean (eps - eps_theta(x_t, t))^2."""
    batch = x_start.shape[0]
    if random_flip:
        flip = torch.rand(batch, device=x_start.device) < 0.5
        x_start = torch.where(flip[:, None, None, None], x_start.flip(-1), x_start)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=x_start.device)
    noise = torch.randn_like(x_start)
    x_t = q_sample(diffusion, x_start, t, noise)  # float32 with float64 coefficients, outside autocast
    eps_pred = unet(x_t, t).sample
    return F.mse_loss(eps_pred.float(), noise)


def build_optimizer(unet: torch.nn.Module, config: TrainingConfig) -> torch.optim.Adam:
    """Adam as in the paper (no weight decay), fused: one kernel updates all parameters, on CPU and CUDA."""
    return torch.optim.Adam(unet.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                            eps=config.adam_epsilon, fused=True)


def parameter_names(unet: torch.nn.Module) -> list[str]:
    return [name for name, _ in unet.named_parameters()]


def ema_copy(unet: torch.nn.Module, ema: ExponentialMovingAverage) -> torch.nn.Module:
    """A copy of `unet` holding the EMA weights, in eval mode and contiguous (NCHW) layout."""
    averaged = copy.deepcopy(unet).to(memory_format=torch.contiguous_format).eval()
    ema.copy_to(averaged.parameters())
    return averaged


def make_pipeline(unet: torch.nn.Module, preset: str):
    from .pipelines.pipeline_ddpm_paper import DDPMPaperPipeline
    from .scheduler import paper_scheduler

    pipe = DDPMPaperPipeline(unet=unet, scheduler=paper_scheduler(preset))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_grid(unet: torch.nn.Module, config: TrainingConfig, step: int):
    """A PIL grid of `num_sample_images` samples (fixed seed), leaving every global RNG untouched."""
    from .images import make_grid

    with torch.random.fork_rng(devices=[]):
        images = make_pipeline(unet, config.preset)(
            batch_size=config.num_sample_images, num_inference_steps=config.sample_inference_steps,
            generator=torch.Generator(device=next(unet.parameters()).device).manual_seed(0), output_type="np",
        ).images
    return make_grid(images, scale=max(1, 64 // images.shape[1]))


def save_final_pipeline(unet: torch.nn.Module, ema: ExponentialMovingAverage, config: TrainingConfig) -> Path:
    """OUTPUT/pipeline: the EMA weights as the pipeline's UNet, the raw weights as variant `non_ema`."""
    path = Path(config.output_dir) / "pipeline"
    make_pipeline(ema_copy(unet, ema), config.preset).save_pretrained(path)
    unet.to(memory_format=torch.contiguous_format).save_pretrained(path / "unet", variant="non_ema")
    return path


def check_finite(first_bad_step: torch.Tensor, accelerator, config: TrainingConfig) -> None:
    """Raise `NonFiniteLossError` on every process if any process's loss was NaN/inf so far (one host sync,
    at log and checkpoint steps only)."""
    bad_steps = accelerator.gather(first_bad_step[None]).cpu()
    bad_steps = bad_steps[bad_steps >= 0]
    if bad_steps.numel():
        from .checkpoints import list_checkpoints

        kept = list_checkpoints(Path(config.output_dir) / "checkpoints")
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written before it"
        raise NonFiniteLossError(f"the loss became non-finite at step {int(bad_steps.min())}; training stopped and {last}.")


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state the memory layout (channels-last or not) of its parameter, so a resumed
    step runs the very same kernels as an uninterrupted one."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def resume_checkpoint(config: TrainingConfig) -> Checkpoint | None:
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        return load_latest_checkpoint(Path(config.output_dir) / "checkpoints")
    return load_checkpoint(config.resume_from_checkpoint)


def warn_config_changes(saved: dict[str, Any], config: TrainingConfig, log) -> None:
    changed = {k: (saved.get(k), v) for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if changed:
        log(f"warning: resuming with settings that differ from the checkpoint's (saved, now): {changed}")


# --- The run. ---


def train(config: TrainingConfig, dataset: ImageDataset | None = None) -> TrainingResult:
    """Train the preset's UNet with the paper's recipe and save the pipeline to `OUTPUT/pipeline`.

    Args:
        config ([`TrainingConfig`]):
            The run's settings; `None` recipe fields take the preset's values.
        dataset (`ImageDataset`, *optional*):
            Training images as any object with `__len__` and uint8 `[C, H, W]` items; by default
            `load_image_dataset(config.dataset, ...)`.

    Returns:
        [`TrainingResult`]: the final step and mean loss of the last logging window, the raw and EMA networks,
        and the pipeline folder.

    Raises:
        `NonFiniteLossError` when the loss becomes NaN/inf (the newest checkpoint stays the last good one);
        `ValueError`/`FileNotFoundError` for bad settings or data, before training starts;
        `CorruptCheckpointError` when `resume_from_checkpoint` names a damaged checkpoint (with `"latest"`, damaged
        checkpoints are skipped with a warning).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    from .scheduler import paper_scheduler

    config = config.resolve()
    output = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, project_dir=str(output),
        log_with=None if config.log_with == "none" else config.log_with,
    )
    config = config.for_device(accelerator.device.type)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    micro_batch = config.batch_size // config.gradient_accumulation_steps  # images per micro-step, all processes
    if config.batch_size % (config.gradient_accumulation_steps * world_size):
        raise ValueError(f"`batch_size` {config.batch_size} must divide into {config.gradient_accumulation_steps} "
                         f"accumulation steps x {world_size} processes.")
    preset = get_preset(config.preset)

    # 1. Data, checked before anything else is built.
    dataset = dataset if dataset is not None else load_image_dataset(config.dataset, preset.image_size, preset.channels)
    if len(dataset) < micro_batch:
        raise ValueError(f"the data set has {len(dataset)} images, fewer than one micro-batch of {micro_batch}.")

    # 2. The network (same initial weights on every process), Adam, the EMA and the float64 coefficients.
    torch.manual_seed(config.seed)
    unet = PaperUNet2DModel.from_preset(config.preset, dropout=config.dropout).to(accelerator.device)
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(unet, config)
    model, optimizer = accelerator.prepare(unet, optimizer)
    unet = accelerator.unwrap_model(model)
    # Compiled for the training forward only; sampling, EMA copies and checkpoints use the plain module.
    forward = torch.compile(model, dynamic=False) if config.compile else model
    ema = ExponentialMovingAverage(unet.parameters(), config.ema_decay)
    diffusion = GaussianDiffusion.from_config(paper_scheduler(config.preset).config)
    names = parameter_names(unet)

    # 3. Resume, or seed each process's noise differently.
    step = 0
    checkpoint = resume_checkpoint(config)
    if checkpoint is not None:
        warn_config_changes(checkpoint.trainer_state["config"], config, accelerator.print)
        unet.load_state_dict(checkpoint.model)
        ema.load_state_dict(checkpoint.ema, names)
        optimizer.load_state_dict(checkpoint.optimizer)
        match_parameter_layout(optimizer)
        step = checkpoint.step
        if len(checkpoint.rng_states) == world_size:
            restore_rng_state(checkpoint.rng_states[rank])
        else:
            accelerator.print(f"warning: the checkpoint has RNG states for {len(checkpoint.rng_states)} processes, "
                              f"this run has {world_size}; reseeding (the run is no longer bitwise reproducible).")
            set_seed(config.seed + step, device_specific=True)
        accelerator.print(f"resumed from {checkpoint.path} at step {step}")
        del checkpoint
    else:
        set_seed(config.seed, device_specific=True)

    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "training_config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    accelerator.print(f"training config: {json.dumps(asdict(config))}")
    accelerator.print(f"{world_size} process(es) on {accelerator.device}, {len(dataset)} images, "
                      f"{sum(p.numel() for p in unet.parameters()):,} parameters")
    if config.log_with != "none":
        accelerator.init_trackers("tensorboard")

    # 4. The loop (Algorithm 1).
    batches = image_batches(dataset, step * config.gradient_accumulation_steps, config, micro_batch, rank, world_size)
    first_bad_step = torch.tensor(-1, device=accelerator.device)  # first step with a non-finite loss
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    loss_value = float("nan")
    with tqdm(total=config.max_steps, initial=step, desc="train", unit="step",
              disable=not accelerator.is_main_process) as progress:  # closed on errors too
        model.train()
        while step < config.max_steps:
            lr = learning_rate_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(config.gradient_accumulation_steps):
                x_start = to_model_range(next(batches).to(accelerator.device, non_blocking=True))
                if config.channels_last:
                    x_start = x_start.contiguous(memory_format=torch.channels_last)
                last_micro = micro == config.gradient_accumulation_steps - 1
                with accelerator.no_sync(model) if not last_micro else nullcontext():
                    loss = training_loss(forward, diffusion, x_start, config.random_flip)
                    accelerator.backward(loss / config.gradient_accumulation_steps)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(unet.parameters())
            first_bad_step = torch.where(torch.isfinite(loss) | (first_bad_step >= 0), first_bad_step, step + 1)
            loss_sum += loss.detach()
            loss_count += 1
            step += 1
            progress.update(1)

            if step % config.log_every == 0 or step == config.max_steps:
                check_finite(first_bad_step, accelerator, config)
                loss_value = float(accelerator.reduce(loss_sum, reduction="mean")) / loss_count
                loss_sum.zero_()
                loss_count = 0
                progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)  # tqdm itself shows steps/s
                accelerator.log({"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}, step=step)

            if (config.checkpointing_steps and step % config.checkpointing_steps == 0) or step == config.max_steps:
                check_finite(first_bad_step, accelerator, config)
                rng_states = gather_object([capture_rng_state()])  # every process's, written by the main one
                if accelerator.is_main_process:
                    save_checkpoint(
                        output / "checkpoints", step=step, model=unet.state_dict(), ema=ema.state_dict(names),
                        optimizer=optimizer.state_dict(), rng_states=rng_states, total_limit=config.checkpoints_total_limit,
                        trainer_state={"config": asdict(config), "world_size": world_size, "lr": lr,
                                       "data_position": {"micro_step": step * config.gradient_accumulation_steps,
                                                         "permutation_seed": config.seed, "global_micro_batch": micro_batch}},
                    )
                accelerator.wait_for_everyone()

            if config.sample_every and step % config.sample_every == 0 and accelerator.is_main_process:
                grid = sample_grid(ema_copy(unet, ema), config, step)
                (output / "samples").mkdir(exist_ok=True)
                grid.save(output / "samples" / f"step-{step:08d}.png")
                if config.log_with == "tensorboard":
                    accelerator.get_tracker("tensorboard").log_images(
                        {"samples": np.asarray(grid.convert("RGB"))[None]}, step=step, dataformats="NHWC"
                    )

    # 5. The pipeline, with the EMA weights.
    accelerator.wait_for_everyone()
    pipeline_dir = output / "pipeline"
    if accelerator.is_main_process:
        pipeline_dir = save_final_pipeline(unet, ema, config)
    accelerator.end_training()
    return TrainingResult(step=step, loss=loss_value, unet=unet, ema_unet=ema_copy(unet, ema), pipeline_dir=pipeline_dir)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """A `TrainingConfig` from parsed `ddpm train` flags (those the user left out stay at their defaults)."""
    return TrainingConfig(**{f.name: getattr(args, f.name) for f in fields(TrainingConfig) if hasattr(args, f.name)})


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m ddpm_plugin.training ...` (the same flags as `ddpm train`)."""
    from .cli.train import add_training_arguments, run

    parser = argparse.ArgumentParser(prog="python -m ddpm_plugin.training", description=__doc__.split("\n")[0])
    add_training_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as error:
        print(f"ddpm_plugin.training: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
