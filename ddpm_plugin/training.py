"""Training with the DDPM paper's recipe (Ho et al. 2020, Algorithm 1 and Appendix B), on Accelerate.

One loop, read top to bottom: a config, the data, the model, then a loop that draws a batch, takes one Adam
step on L_simple = E ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2, updates the EMA,
logs, checkpoints and samples. Accelerate appears only at the edges (processes, DDP, autocast, trackers).

The same code runs on one CPU, on several processes or on many GPUs; only the launch changes:

```sh
ddpm train --preset digits --output-dir runs/digits
accelerate launch --multi_gpu --num_processes 8 -m ddpm_plugin.cli train --preset cifar10 --output-dir runs/cifar10
```

A run writes `OUTPUT/training_config.json`, `OUTPUT/checkpoints/checkpoint-<step>/`, `OUTPUT/tensorboard/`,
`OUTPUT/samples/step-<step>.png` and, at the end, the pipeline `OUTPUT/pipeline/` (EMA weights, the raw weights
as variant `non_ema`). A folder that already holds a run is only resumed, or started over when asked.

Exact resume: batches are indexed out of a seeded per-epoch permutation, so the data position is a function of
the step (nothing is iterated to skip batches), and each checkpoint holds every process's RNG states and the
losses summed since the last log, so a resumed run logs the values the uninterrupted one does.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

# Checkpoints are safetensors and JSON, not torch.save: loading a pickle can run arbitrary code.
from .checkpoints import (
    Checkpoint,
    CheckpointWriteError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    match_json_permissions,
    non_finite_tensors,
    restore_rng_state,
    save_checkpoint,
)
from .data import DataError, ImageDataset, load_image_dataset
# Hand-written EMA: diffusers' EMAModel ramps its decay up; the paper's decay (0.9999) is fixed from step 0.
from .ema import ExponentialMovingAverage
from .pipelines.diffusion_ops import q_sample, to_model_range
from .pipelines.gaussian_diffusion import GaussianDiffusion
from .presets import PaperUNet2DModel, get_preset
from .sampling import sample_grid
from .training_config import RESUMABLE_CHANGES, ConfigError, TrainingConfig
from .trust import write_atomically, write_json
from .vocabulary import ONNX_SUBFOLDER, TRAINING_CONFIG_FILE

NAMES_SHOWN = 5  # non-finite tensors named in the message
PERMUTATION_SEED_OFFSET = 1_000_003  # keeps the data order's generator apart from the model-init seed
RUN_ENTRIES = (TRAINING_CONFIG_FILE, "checkpoints", "tensorboard", "samples", "pipeline")  # what a run writes

Log = Callable[[str], None]  # prints once, on the main process


@dataclass
class TrainingResult:
    """What `train` returns: the final step and loss, the trained networks, and where the run's files are."""

    step: int
    loss: float  # the mean loss of the last logging window (NaN when none was logged)
    unet: torch.nn.Module  # the raw (non-EMA) weights
    ema_unet: torch.nn.Module  # the EMA weights, as saved in the pipeline
    pipeline_dir: Path
    already_finished: bool = False  # the resumed checkpoint had reached `max_steps`: nothing was trained or written


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is kept."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The weights (or their EMA) became NaN or infinite, possibly with a finite loss; nothing was saved and the
    last good checkpoint is kept."""


def check_finite_weights(named: dict[str, dict[str, torch.Tensor]], step: int, checkpoints: Path) -> None:
    """`NonFiniteWeightsError` naming every non-finite tensor of each of `named` ("weights", "EMA weights", ...)."""
    bad = {what: names for what, tensors in named.items() if (names := non_finite_tensors(tensors))}
    if bad:
        kept = list_checkpoints(checkpoints)
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written before it"
        listed = "; ".join(f"{what}: {', '.join(names[:NAMES_SHOWN])}{' and more' if len(names) > NAMES_SHOWN else ''} "
                           f"({len(names)} of {len(named[what])} tensors)" for what, names in bad.items())
        raise NonFiniteWeightsError(f"the weights became non-finite at step {step} ({listed}); nothing was saved and "
                                    f"{last}. Lower the learning rate.")


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


def next_batch(batches: Iterator[torch.Tensor]) -> torch.Tensor:
    """The next micro-batch; a data error names its file in one line, also when a loader worker raised it (the
    loader re-raises it with the worker's traceback as the message, whose last line is ours)."""
    try:
        return next(batches)
    except DataError as error:
        raise DataError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


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


def training_samples(unet: torch.nn.Module, config: TrainingConfig):
    """A PIL grid of `num_sample_images` samples (seed 0), leaving every global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        return sample_grid(make_pipeline(unet, config.preset), config.num_sample_images,
                           config.sample_inference_steps)


def save_final_pipeline(unet: torch.nn.Module, ema: ExponentialMovingAverage, config: TrainingConfig, log: Log) -> Path:
    """OUTPUT/pipeline: the EMA weights as the pipeline's UNet, the raw weights as variant `non_ema`. An ONNX export
    left in it was made from other weights and is removed."""
    path = Path(config.output_dir) / "pipeline"
    stale_export = path / ONNX_SUBFOLDER
    if stale_export.is_dir():
        shutil.rmtree(stale_export)
        log(f"removed {stale_export}: it was exported from earlier weights (export again with `ddpm export`)")
    make_pipeline(ema_copy(unet, ema), config.preset).save_pretrained(path)
    unet.to(memory_format=torch.contiguous_format).save_pretrained(path / "unet", variant="non_ema")
    match_json_permissions(path)
    return path


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state the memory layout (channels-last or not) of its parameter, so a resumed
    step runs the very same kernels as an uninterrupted one."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# --- The run's state, and the steps of `train`. ---


class LossWindow:
    """The step losses since the last log, summed on the device (no host sync per step), and the first step whose
    loss was not finite (checked at log and checkpoint steps only)."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.first_bad_step = torch.tensor(-1, device=device)
        self.last_mean = math.nan  # the last logged mean

    def add(self, step_loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(step_loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        self.total += step_loss
        self.count += 1

    def check_finite(self, accelerator: Any, checkpoints: Path) -> None:
        """Raise `NonFiniteLossError` on every process if any process's loss was NaN/inf so far."""
        bad_steps = accelerator.gather(self.first_bad_step[None]).cpu()
        bad_steps = bad_steps[bad_steps >= 0]
        if bad_steps.numel():
            kept = list_checkpoints(checkpoints)
            last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written before it"
            raise NonFiniteLossError(f"the loss became non-finite at step {int(bad_steps.min())}; training stopped and {last}.")

    def mean(self, accelerator: Any) -> float:
        """The window's mean loss over every process, then a new window."""
        self.last_mean = float(accelerator.reduce(self.total, reduction="mean")) / self.count
        self.total.zero_()
        self.count = 0
        return self.last_mean

    def state_dict(self) -> dict[str, Any]:
        """This process's window, exactly (a float32 sum is exact as a JSON float)."""
        return {"total": float(self.total), "count": self.count}

    def load_state_dict(self, windows: list[dict[str, Any]], rank: int, world_size: int, last_mean: float | None) -> None:
        """Restore this process's window from every process's; with another process count, each takes their mean
        sum, which keeps the logged mean. Checkpoints written before windows were saved hold none: a new window."""
        if windows:
            same_layout = len(windows) == world_size
            self.total.fill_(windows[rank]["total"] if same_layout else sum(w["total"] for w in windows) / len(windows))
            self.count = windows[0]["count"]
        self.last_mean = math.nan if last_mean is None else last_mean


@dataclass
class TrainingState:
    """What a checkpoint holds and a resume restores: the network, its EMA, Adam, the step, the loss window, and
    every process's RNG states (captured when saved)."""

    unet: torch.nn.Module  # the unwrapped module whose weights are saved
    ema: ExponentialMovingAverage
    optimizer: torch.optim.Optimizer
    losses: LossWindow
    step: int = 0

    def save(self, accelerator: Any, config: TrainingConfig, micro_batch: int) -> None:
        """Write `OUTPUT/checkpoints/checkpoint-<step>` from the main process; every process raises
        `CheckpointWriteError` if it could not be written."""
        from accelerate.utils import broadcast_object_list, gather_object

        per_process = gather_object([{"rng": capture_rng_state(), "losses": self.losses.state_dict()}])
        failure = None
        names = parameter_names(self.unet)
        weights, ema_weights = self.unet.state_dict(), self.ema.state_dict(names)
        check_finite_weights({"weights": weights, "EMA weights": ema_weights}, self.step,
                             Path(config.output_dir) / "checkpoints")  # every process holds the same weights
        if accelerator.is_main_process:
            trainer_state = {
                "config": asdict(config), "world_size": accelerator.num_processes,
                "lr": learning_rate_at(self.step - 1, config),
                "data_position": {"micro_step": self.step * config.gradient_accumulation_steps,
                                  "permutation_seed": config.seed, "global_micro_batch": micro_batch},
                "loss_window": [p["losses"] for p in per_process],
                "loss": None if math.isnan(self.losses.last_mean) else self.losses.last_mean,
            }
            try:
                save_checkpoint(Path(config.output_dir) / "checkpoints", step=self.step, model=weights,
                                ema=ema_weights, optimizer=self.optimizer.state_dict(),
                                rng_states=[p["rng"] for p in per_process], trainer_state=trainer_state,
                                total_limit=config.checkpoints_total_limit)
            except CheckpointWriteError as error:
                failure = str(error)
        failure = broadcast_object_list([failure])[0]  # also the barrier after the write
        if failure is not None:
            raise CheckpointWriteError(failure)

    def restore(self, checkpoint: Checkpoint, accelerator: Any, config: TrainingConfig, log: Log) -> None:
        """Continue from `checkpoint`: weights, EMA, Adam, step, loss window and this process's RNG states."""
        from accelerate.utils import set_seed

        saved = checkpoint.trainer_state.get("config", {})
        try:
            self.unet.load_state_dict(checkpoint.model)
            self.ema.load_state_dict(checkpoint.ema, parameter_names(self.unet))
        except (RuntimeError, ValueError) as error:
            first_line = str(error).strip().splitlines()[-1].strip()
            raise ConfigError("preset", f"{config.preset!r} ({_describe(config.preset)}) does not fit the weights in "
                                        f"{checkpoint.path} ({first_line}).") from None
        self.optimizer.load_state_dict(checkpoint.optimizer)
        match_parameter_layout(self.optimizer)
        self.step = checkpoint.step
        rank, world_size = accelerator.process_index, accelerator.num_processes
        if len(checkpoint.rng_states) == world_size:
            restore_rng_state(checkpoint.rng_states[rank])
        else:
            log(f"warning: the checkpoint has RNG states for {len(checkpoint.rng_states)} processes, this run has "
                f"{world_size}; reseeding (the run is no longer bitwise reproducible).")
            set_seed(config.seed + self.step, device_specific=True)
        self.losses.load_state_dict(checkpoint.trainer_state.get("loss_window", []), rank, world_size,
                                    checkpoint.trainer_state.get("loss"))
        warn_config_changes(saved, config, log)
        log(f"resumed from {checkpoint.path} at step {self.step}")


def check_checkpoint_preset(checkpoint: Checkpoint, config: TrainingConfig) -> None:
    """`ConfigError` naming both presets when `checkpoint` was trained with another preset than `config`'s."""
    saved = checkpoint.trainer_state.get("config", {}).get("preset", config.preset)
    if saved != config.preset:
        raise ConfigError("preset", f"is {config.preset!r} ({_describe(config.preset)}), but {checkpoint.path} was "
                                    f"trained with preset {saved!r} ({_describe(saved)}); "
                                    f"resume with `preset` {saved} or train into another `output_dir`.")


def _describe(preset: str) -> str:
    try:
        spec = get_preset(preset)
    except ValueError:
        return "not a preset of this version"
    return f"{spec.image_size}x{spec.image_size}x{spec.channels}, {spec.num_parameters:,} parameters"


def warn_config_changes(saved: dict[str, Any], config: TrainingConfig, log: Log) -> None:
    changed = {k: (saved[k], v) for k, v in asdict(config).items()
               if k in saved and k not in RESUMABLE_CHANGES and saved[k] != v}
    if changed:
        log(f"warning: resuming with settings that differ from the checkpoint's (saved, now): {changed}")


def claim_output_dir(config: TrainingConfig) -> list[Path]:
    """The run files already in `output_dir` that this run may replace: none unless `overwrite`. A new run into a
    folder that holds one is refused (nothing is touched) unless it resumes or overwrites."""
    output = Path(config.output_dir)
    found = [output / name for name in RUN_ENTRIES if (output / name).exists()]
    if found and config.resume_from_checkpoint is None and not config.overwrite:
        raise ConfigError("output_dir", f"already holds a run ({output}: {', '.join(p.name for p in found)}); pass "
                                        "`resume_from_checkpoint` latest to continue it, `overwrite` to start it over, "
                                        "or another `output_dir`.")
    return found if config.overwrite else []


def start_run_files(config: TrainingConfig, replaced: list[Path], accelerator: Any, log: Log) -> None:
    """On the main process, once every process has checked the folder: remove the files of the run being
    overwritten, then write `training_config.json`."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    for path in replaced:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if replaced:
        log(f"overwrite: removed {', '.join(p.name for p in replaced)} from {config.output_dir}")
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / TRAINING_CONFIG_FILE, asdict(config))


def checkpoint_to_resume(config: TrainingConfig, log: Log) -> Checkpoint | None:
    """The checkpoint `resume_from_checkpoint` names, or None (saying so when "latest" finds none)."""
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        checkpoints = Path(config.output_dir) / "checkpoints"
        checkpoint = load_latest_checkpoint(checkpoints)
        if checkpoint is None:
            log(f"no checkpoint in {checkpoints} to resume from: starting at step 0")
        return checkpoint
    if not Path(config.resume_from_checkpoint).is_dir():
        raise ConfigError("resume_from_checkpoint", f"must be \"latest\" or a checkpoint folder; "
                                                    f"{config.resume_from_checkpoint} is not a folder.")
    return load_checkpoint(config.resume_from_checkpoint)


def resume_or_seed(state: TrainingState, checkpoint: Checkpoint | None, config: TrainingConfig, accelerator: Any,
                   log: Log) -> None:
    """Continue from `checkpoint`, or seed each process's noise differently."""
    from accelerate.utils import set_seed

    if checkpoint is None:
        set_seed(config.seed, device_specific=True)
    else:
        state.restore(checkpoint, accelerator, config, log)


def optimizer_step(state: TrainingState, model: torch.nn.Module, forward: torch.nn.Module, batches: Iterator[torch.Tensor],
                   diffusion: GaussianDiffusion, config: TrainingConfig, accelerator: Any) -> tuple[float, torch.Tensor]:
    """One Adam step on `gradient_accumulation_steps` micro-batches (Algorithm 1), then the EMA update. Every
    micro-batch's loss enters the step's loss (their mean), which the loss window logs and checks for NaN.
    Returns the learning rate and the gradient norm before clipping."""
    lr = learning_rate_at(state.step, config)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    accumulation = config.gradient_accumulation_steps
    step_loss = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        x_start = to_model_range(next_batch(batches).to(accelerator.device, non_blocking=True))
        if config.channels_last:
            x_start = x_start.contiguous(memory_format=torch.channels_last)
        with accelerator.no_sync(model) if micro < accumulation - 1 else nullcontext():
            loss = training_loss(forward, diffusion, x_start, config.random_flip)
            accelerator.backward(loss / accumulation)
        step_loss += loss.detach() / accumulation
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update(state.unet.parameters())
    state.step += 1
    state.losses.add(step_loss, state.step)
    return lr, grad_norm


def log_checkpoint_sample(state: TrainingState, lr: float, grad_norm: torch.Tensor, config: TrainingConfig,
                          accelerator: Any, progress: Any, micro_batch: int) -> None:
    """After a step: log the loss window, write a checkpoint, save a sample grid, each when it is due."""
    step, output = state.step, Path(config.output_dir)
    if step % config.log_every == 0 or step == config.max_steps:
        state.losses.check_finite(accelerator, output / "checkpoints")
        loss = state.losses.mean(accelerator)
        progress.set_postfix(loss=f"{loss:.4f}", refresh=False)  # tqdm itself shows steps/s
        accelerator.log({"loss": loss, "lr": lr, "grad_norm": float(grad_norm)}, step=step)

    if (config.checkpointing_steps and step % config.checkpointing_steps == 0) or step == config.max_steps:
        state.losses.check_finite(accelerator, output / "checkpoints")
        state.save(accelerator, config, micro_batch)

    if config.sample_every and step % config.sample_every == 0 and accelerator.is_main_process:
        grid = training_samples(ema_copy(state.unet, state.ema), config)
        (output / "samples").mkdir(exist_ok=True)
        write_atomically(output / "samples" / f"step-{step:08d}.png", lambda file: grid.save(file, format="PNG"))
        if config.log_with == "tensorboard":
            accelerator.get_tracker("tensorboard").log_images(
                {"samples": np.asarray(grid.convert("RGB"))[None]}, step=step, dataformats="NHWC"
            )


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
        and the pipeline folder. Resuming a checkpoint at `max_steps` changes nothing (`already_finished`).

    Raises:
        `ConfigError` (a `ValueError` naming the setting) for bad settings, a folder that holds another run, or
        a checkpoint of another preset; `DataError` naming the file for bad data, before training starts and
        during it; `NonFiniteLossError` when the loss becomes NaN/inf and `CheckpointWriteError` when a
        checkpoint cannot be written (a full disk): in both cases the newest checkpoint stays the last good one;
        `CorruptCheckpointError` when `resume_from_checkpoint` names a damaged checkpoint (with `"latest"`,
        damaged checkpoints are skipped with a warning).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .scheduler import paper_scheduler

    config = config.resolve()
    output = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, project_dir=str(output),
        log_with=None if config.log_with == "none" else config.log_with,
    )
    log = accelerator.print
    config = config.for_device(accelerator.device.type)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    micro_batch = config.batch_size // config.gradient_accumulation_steps  # images per micro-step, all processes
    if config.batch_size % (config.gradient_accumulation_steps * world_size):
        raise ConfigError("batch_size", f"{config.batch_size} must divide into {config.gradient_accumulation_steps} "
                                        f"accumulation steps x {world_size} processes.")
    replaced = claim_output_dir(config)
    preset = get_preset(config.preset)
    checkpoint = checkpoint_to_resume(config, log)  # a checkpoint of another preset is refused before the data load
    if checkpoint is not None:
        check_checkpoint_preset(checkpoint, config)

    # 1. Data, checked before anything else is built.
    dataset = dataset if dataset is not None else load_image_dataset(config.dataset, preset.image_size, preset.channels)
    if len(dataset) < micro_batch:
        raise DataError(f"the data set has {len(dataset)} images, fewer than one micro-batch of {micro_batch}.")

    # 2. The network (same initial weights on every process), Adam, the EMA and the float64 coefficients.
    torch.manual_seed(config.seed)
    unet = PaperUNet2DModel.from_preset(config.preset, dropout=config.dropout).to(accelerator.device)
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(unet, build_optimizer(unet, config))
    unet = accelerator.unwrap_model(model)
    # Compiled for the training forward only; sampling, EMA copies and checkpoints use the plain module.
    forward = torch.compile(model, dynamic=False) if config.compile else model
    state = TrainingState(unet, ExponentialMovingAverage(unet.parameters(), config.ema_decay), optimizer,
                          LossWindow(accelerator.device))
    diffusion = GaussianDiffusion.from_config(paper_scheduler(config.preset).config)

    # 3. Resume, or seed each process's noise differently.
    resume_or_seed(state, checkpoint, config, accelerator, log)
    if state.step >= config.max_steps:
        log(f"the run in {output} is finished: its checkpoint is at step {state.step} of max_steps {config.max_steps}; "
            "nothing was changed (raise max_steps to train further).")
        return TrainingResult(step=state.step, loss=state.losses.last_mean, unet=unet, ema_unet=ema_copy(unet, state.ema),
                              pipeline_dir=output / "pipeline", already_finished=True)

    start_run_files(config, replaced, accelerator, log)
    log(f"training config: {json.dumps(asdict(config))}")
    log(f"{world_size} process(es) on {accelerator.device}, {len(dataset)} images, "
        f"{sum(p.numel() for p in unet.parameters()):,} parameters")
    if config.log_with != "none":
        accelerator.init_trackers("tensorboard")

    # 4. The loop (Algorithm 1).
    batches = image_batches(dataset, state.step * config.gradient_accumulation_steps, config, micro_batch, rank, world_size)
    with tqdm(total=config.max_steps, initial=state.step, desc="train", unit="step",
              disable=not accelerator.is_main_process) as progress:  # closed on errors too
        if not math.isnan(state.losses.last_mean):
            progress.set_postfix(loss=f"{state.losses.last_mean:.4f}", refresh=False)
        model.train()
        while state.step < config.max_steps:
            lr, grad_norm = optimizer_step(state, model, forward, batches, diffusion, config, accelerator)
            progress.update(1)
            log_checkpoint_sample(state, lr, grad_norm, config, accelerator, progress, micro_batch)

    # 5. The pipeline, with the EMA weights.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final_pipeline(unet, state.ema, config, log)
    accelerator.end_training()
    return TrainingResult(step=state.step, loss=state.losses.last_mean, unet=unet, ema_unet=ema_copy(unet, state.ema),
                          pipeline_dir=output / "pipeline")


if __name__ == "__main__":  # `python -m ddpm_plugin.training ARGS` is `ddpm train ARGS`, kept for older launch lines
    import runpy

    sys.argv[1:1] = ["train"]
    runpy.run_module("ddpm_plugin.cli", run_name="__main__", alter_sys=True)
