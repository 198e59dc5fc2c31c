"""The settings of a training run, with the paper's recipe as defaults (Ho et al. 2020, Appendix B).

Kept apart from the training loop and free of torch so that `ddpm --help` and `ddpm train --help` start
quickly: every field here becomes a `ddpm train` flag, its trailing comment the flag's help.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .presets import get_preset

# Config fields that may change when a run is resumed; any other difference gets a warning.
RESUMABLE_CHANGES = {"max_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                     "sample_every", "num_sample_images", "sample_inference_steps", "log_every", "log_with", "output_dir"}
# Fields a `TrainingConfig` may leave `None` to take the preset's value (same names as `Preset`'s).
RECIPE_FIELDS = ("dataset", "batch_size", "learning_rate", "warmup_steps", "grad_clip_norm", "ema_decay", "dropout",
                 "random_flip")


@dataclass
class TrainingConfig:
    """Every setting of a run. Recipe fields left `None` take the preset's value (the paper's for cifar10,
    celebahq and lsun); `resolve()` fills them, and the resolved config is logged and saved with every
    checkpoint."""

    preset: str = "cifar10"  # architecture and recipe, a key of `ddpm_plugin.presets.PRESETS`
    dataset: str | None = None  # digits | mnist | image folder | .npz | HF datasets name or path
    output_dir: str = "ddpm-output"  # folder for checkpoints/, tensorboard/, samples/ and pipeline/
    max_steps: int = 800_000  # optimizer steps in total (paper: 800k for CIFAR-10)
    batch_size: int | None = None  # images per optimizer step, summed over processes (paper: 128; 64 at 256x256)
    learning_rate: float | None = None  # Adam step size after warmup (paper: 2e-4; 2e-5 at 256x256)
    warmup_steps: int | None = None  # optimizer steps of linear learning-rate warmup from 0 (paper: 5000)
    adam_beta1: float = 0.9  # Adam's first-moment decay (paper: TensorFlow's default)
    adam_beta2: float = 0.999  # Adam's second-moment decay
    adam_epsilon: float = 1e-8  # Adam's denominator floor
    grad_clip_norm: float | None = None  # maximum global L2 norm of the gradient (paper: 1.0)
    ema_decay: float | None = None  # EMA weight of the old average per step, from step 0 (paper: 0.9999)
    dropout: float | None = None  # dropout probability in the ResNet blocks (paper: 0.1 for CIFAR-10)
    random_flip: bool | None = None  # random horizontal flips (paper: on; off for digits/MNIST)
    seed: int = 0  # seeds the initial weights, the data order and each process's noise
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast of the network's forward pass
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    num_workers: int = 0  # data-loading worker processes per training process (0: load in the training loop)
    channels_last: bool | None = None  # NHWC memory layout for the convolutions (default: on CUDA, off on CPU)
    compile: bool = False  # torch.compile the UNet's training forward (minutes to compile, faster steps after)
    checkpointing_steps: int = 5000  # optimizer steps between checkpoints (0: only at the end)
    checkpoints_total_limit: int | None = None  # newest checkpoints kept (None: all)
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    sample_every: int = 0  # optimizer steps between sample grids (0: never)
    num_sample_images: int = 16  # images per sample grid
    sample_inference_steps: int = 1000  # denoising steps per sample grid
    log_every: int = 50  # optimizer steps between logged scalars (loss, lr, grad norm)
    log_with: Literal["tensorboard", "none"] = "tensorboard"  # scalar and image logger

    def resolve(self) -> "TrainingConfig":
        """This config with every `None` recipe value taken from the preset, validated."""
        preset = get_preset(self.preset)
        recipe = {name: getattr(preset, name) for name in RECIPE_FIELDS}
        recipe["dataset"] = preset.dataset or self.preset
        config = replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "num_sample_images",
                     "sample_inference_steps", "log_every"):
            if getattr(config, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(config, name)!r}.")
        for name in ("warmup_steps", "checkpointing_steps", "sample_every"):
            if getattr(config, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(config, name)!r}.")
        if config.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"`mixed_precision` must be 'no', 'fp16' or 'bf16', got {config.mixed_precision!r}.")
        if config.log_with not in ("tensorboard", "none"):
            raise ValueError(f"`log_with` must be 'tensorboard' or 'none', got {config.log_with!r}.")
        return config

    def for_device(self, device_type: str) -> "TrainingConfig":
        """This config with the device's defaults: channels-last (NHWC) on CUDA, where convolutions under mixed
        precision prefer it; NCHW on CPU, where NHWC measured 0-15% slower for digits and cifar10, fp32 and bf16
        (torch 2.13, oneDNN, an AVX512-BF16 CPU)."""
        if self.channels_last is not None:
            return self
        return replace(self, channels_last=device_type == "cuda")
