"""The settings of a training run, with the paper's recipe as defaults (Ho et al. 2020, Appendix B).

Kept apart from the training loop and free of torch so that `ddpm --help` and `ddpm train --help` start
quickly: every field here becomes a `ddpm train` flag, the `help` in its metadata the flag's help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .presets import PRESETS, get_preset

# Config fields that may change when a run is resumed; any other difference gets a warning.
RESUMABLE_CHANGES = {"max_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                     "sample_every", "num_sample_images", "sample_inference_steps", "log_every", "log_with", "output_dir",
                     "overwrite"}
# T of every preset's schedule (`scheduler.PAPER_SCHEDULER_CONFIG`; here without importing diffusers).
NUM_TRAIN_TIMESTEPS = 1000
# Fields a `TrainingConfig` may leave `None` to take the preset's value (same names as `Preset`'s).
RECIPE_FIELDS = ("dataset", "batch_size", "learning_rate", "warmup_steps", "grad_clip_norm", "ema_decay", "dropout",
                 "random_flip")


class ConfigError(ValueError):
    """A setting has a value it cannot take. `field` names the `TrainingConfig` field (the CLI shows its flag)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"`{field}` {problem}")
        self.field, self.problem = field, problem


def setting(default: Any, help: str) -> Any:
    """A config field with its meaning and unit as `help` (the `ddpm train` flag's help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainingConfig:
    """Every setting of a run. Recipe fields left `None` take the preset's value (the paper's for cifar10,
    celebahq and lsun); `resolve()` fills them, and the resolved config is logged and saved with every
    checkpoint."""

    preset: str = setting("cifar10", "architecture and recipe, a key of `ddpm_plugin.presets.PRESETS`")
    dataset: str | None = setting(None, "digits | mnist | image folder | .npz | HF datasets name or path")
    output_dir: str = setting("ddpm-output", "folder for checkpoints/, tensorboard/, samples/ and pipeline/")
    overwrite: bool = setting(False, "start over in an output folder that holds a run, deleting its checkpoints, "
                                     "logs, samples and pipeline")
    max_steps: int = setting(800_000, "optimizer steps in total (paper: 800k for CIFAR-10)")
    batch_size: int | None = setting(None, "images per optimizer step, summed over processes (paper: 128; 64 at 256x256)")
    learning_rate: float | None = setting(None, "Adam step size after warmup (paper: 2e-4; 2e-5 at 256x256)")
    warmup_steps: int | None = setting(None, "optimizer steps of linear learning-rate warmup from 0 (paper: 5000)")
    adam_beta1: float = setting(0.9, "Adam's first-moment decay (paper: TensorFlow's default)")
    adam_beta2: float = setting(0.999, "Adam's second-moment decay")
    adam_epsilon: float = setting(1e-8, "Adam's denominator floor")
    grad_clip_norm: float | None = setting(None, "maximum global L2 norm of the gradient (paper: 1.0)")
    ema_decay: float | None = setting(None, "EMA weight of the old average per step, from step 0 (paper: 0.9999)")
    dropout: float | None = setting(None, "dropout probability in the ResNet blocks (paper: 0.1 for CIFAR-10)")
    random_flip: bool | None = setting(None, "random horizontal flips (paper: on; off for digits/MNIST)")
    seed: int = setting(0, "seeds the initial weights, the data order and each process's noise")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "autocast of the network's forward pass")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    num_workers: int = setting(0, "data-loading worker processes per training process (0: load in the training loop)")
    channels_last: bool | None = setting(None, "NHWC memory layout for the convolutions (default: on CUDA, off on CPU)")
    compile: bool = setting(False, "torch.compile the UNet's training forward (minutes to compile, faster steps after)")
    checkpointing_steps: int = setting(5000, "optimizer steps between checkpoints (0: only at the end)")
    checkpoints_total_limit: int | None = setting(None, "newest checkpoints kept (default: all)")
    resume_from_checkpoint: str | None = setting(None, '"latest" (in OUTPUT/checkpoints) or a checkpoint folder to '
                                                      "continue from (default: start a new run)")
    sample_every: int = setting(0, "optimizer steps between sample grids (0: never)")
    num_sample_images: int = setting(16, "images per sample grid")
    sample_inference_steps: int = setting(1000, "denoising steps per sample grid")
    log_every: int = setting(50, "optimizer steps between logged scalars (loss, lr, grad norm)")
    log_with: Literal["tensorboard", "none"] = setting("tensorboard", "scalar and image logger")

    def resolve(self) -> "TrainingConfig":
        """This config with every `None` recipe value taken from the preset, validated (`ConfigError`)."""
        try:
            preset = get_preset(self.preset)
        except ValueError:
            raise ConfigError("preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}.") from None
        recipe = {name: getattr(preset, name) for name in RECIPE_FIELDS}
        recipe["dataset"] = preset.dataset or self.preset
        config = replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})
        config.check()
        return config

    def check(self) -> None:
        """Raise `ConfigError` naming the first field whose value is out of its range, before any work: a run
        never stops at its first sample grid or checkpoint for a setting it could have refused at start."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float):
                _require(self, item.name, math.isfinite(value), "must be a finite number")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "num_sample_images",
                     "sample_inference_steps", "log_every"):
            _require(self, name, getattr(self, name) >= 1, "must be at least 1")
        _require(self, "sample_inference_steps", self.sample_inference_steps <= NUM_TRAIN_TIMESTEPS,
                 f"must be at most the {NUM_TRAIN_TIMESTEPS} timesteps of the training schedule")
        for name in ("warmup_steps", "checkpointing_steps", "sample_every", "num_workers", "seed"):
            _require(self, name, getattr(self, name) >= 0, "must be >= 0")
        for name in ("learning_rate", "grad_clip_norm", "adam_epsilon"):
            _require(self, name, getattr(self, name) > 0, "must be > 0")
        for name in ("adam_beta1", "adam_beta2", "ema_decay", "dropout"):
            _require(self, name, 0 <= getattr(self, name) < 1, "must be in [0, 1)")
        if self.checkpoints_total_limit is not None:
            _require(self, "checkpoints_total_limit", self.checkpoints_total_limit >= 1, "must be at least 1")
        _require(self, "mixed_precision", self.mixed_precision in ("no", "fp16", "bf16"), "must be 'no', 'fp16' or 'bf16'")
        _require(self, "log_with", self.log_with in ("tensorboard", "none"), "must be 'tensorboard' or 'none'")
        _require(self, "batch_size", self.batch_size % self.gradient_accumulation_steps == 0,
                 f"must be a multiple of `gradient_accumulation_steps` ({self.gradient_accumulation_steps})")
        if self.overwrite and self.resume_from_checkpoint is not None:
            raise ConfigError("overwrite", "cannot be combined with `resume_from_checkpoint`: resume a run or start it over.")

    def for_device(self, device_type: str) -> "TrainingConfig":
        """This config with the device's defaults: channels-last (NHWC) on CUDA, where convolutions under mixed
        precision prefer it; NCHW on CPU, where channels-last trained slower."""
        if self.channels_last is not None:
            return self
        return replace(self, channels_last=device_type == "cuda")


def _require(config: TrainingConfig, name: str, condition: bool, problem: str) -> None:
    if not condition:
        raise ConfigError(name, f"{problem}, got {getattr(config, name)!r}.")
