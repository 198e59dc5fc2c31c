"""What a model folder asks of this machine, read from its configs before anything is built.

A pipeline folder's `unet/config.json` and `scheduler/scheduler_config.json`, and an ONNX export's
`ddpm_onnx.json`, declare sizes (`sample_size`, `in_channels`, `num_train_timesteps`) that decide how much memory
loading and sampling take. Each is read through `trust.read_json`, checked for its type, and its memory checked
against `trust.check_allocation`, so that a few bytes of JSON cannot ask for gigabytes. Torch-free.
"""

from __future__ import annotations

import os
from numbers import Integral
from typing import Any

from .trust import UntrustedInputError, check_allocation, read_json, regular_file
from .vocabulary import SCHEDULER_CONFIG

UNET_CONFIG = "unet/config.json"
FLOAT32_BYTES = 4
# Float64 arrays of length T kept by the schedule (`GaussianDiffusion`, `DDPMScheduler` and its respaced copies).
SCHEDULE_ARRAYS = 24
# Image-sized float32 buffers sampling keeps per image at once (bound input and output, x_t, x_0, noise, mean).
SAMPLE_BUFFERS = 8


def is_whole_number(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_positive_int(value: Any, where: str, field: str) -> int:
    """`value` when it is a whole number >= 1, else `UntrustedInputError` naming `where` and `field`."""
    if not is_whole_number(value) or value < 1:
        raise UntrustedInputError(f"{where}: `{field}` must be a whole number >= 1, got {value!r}.")
    return int(value)


def check_schedule_size(config: Any, where: str) -> None:
    """Refuse a scheduler configuration that is not a JSON object, or whose `num_train_timesteps` (or
    `trained_betas`) would not fit in memory."""
    if not isinstance(config, dict):
        raise UntrustedInputError(f"{where} must hold a JSON object, got {type(config).__name__}.")
    steps = check_positive_int(config.get("num_train_timesteps", 1000), where, "num_train_timesteps")
    check_allocation(steps * 8 * SCHEDULE_ARRAYS, f"{where} `num_train_timesteps` {steps}")


def check_image_size(sample_size: Any, channels: Any, where: str, batch_size: int = 1,
                     image_bytes: int = FLOAT32_BYTES * SAMPLE_BUFFERS) -> tuple[int, int, int]:
    """`(channels, height, width)` from a config's `sample_size` (an int or `[height, width]`) and channel count,
    refused unless they are whole numbers and `batch_size` images of `image_bytes` per pixel and channel fit in
    memory."""
    if isinstance(sample_size, (list, tuple)) and len(sample_size) == 2:
        height, width = (check_positive_int(size, where, "sample_size") for size in sample_size)
    else:
        height = width = check_positive_int(sample_size, where, "sample_size")
    channels = check_positive_int(channels, where, "in_channels")
    check_allocation(batch_size * channels * height * width * image_bytes,
                     f"{where} `sample_size` {sample_size!r} (images of {channels}x{height}x{width})")
    return channels, height, width


def unet_activation_bytes(unet: dict[str, Any], height: int, width: int, where: str) -> int:
    """An estimate of one image's activations in a `UNet2DModel` forward pass: the first level's
    `block_out_channels[0]` float32 feature maps, kept once per layer for the skip connections, plus the largest
    attention score matrix (tokens x tokens at the resolution of each attention level and of the middle block)."""
    widths = unet.get("block_out_channels", [64])
    if not isinstance(widths, list) or not widths:
        raise UntrustedInputError(f"{where}: `block_out_channels` must be a non-empty list, got {widths!r}.")
    first = check_positive_int(widths[0], where, "block_out_channels")
    layers = check_positive_int(unet.get("layers_per_block", 2), where, "layers_per_block")
    blocks = unet.get("down_block_types", [])
    blocks = blocks if isinstance(blocks, list) else []
    levels = [level for level, block in enumerate(blocks) if "Attn" in str(block)]
    if unet.get("add_attention", True):
        levels.append(max(len(blocks) - 1, 0))
    tokens = max([(height >> level) * (width >> level) for level in levels], default=0)
    return FLOAT32_BYTES * (height * width * first * (layers + 3) + tokens * tokens)


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Refuse a pipeline folder whose UNet or scheduler configuration is not a JSON object, has sizes of the wrong
    type, or declares sizes this machine cannot sample (see [`unet_activation_bytes`]), naming the file and the
    field."""
    unet_path = regular_file(folder, UNET_CONFIG, what="the UNet configuration")
    unet = read_json(unet_path)
    where = str(unet_path)
    if not isinstance(unet, dict):
        raise UntrustedInputError(f"{where} must hold a JSON object, got {type(unet).__name__}.")
    channels, height, width = check_image_size(unet.get("sample_size"), unet.get("in_channels", 3), where)
    check_positive_int(unet.get("out_channels", channels), where, "out_channels")
    check_allocation(unet_activation_bytes(unet, height, width, where),
                     f"{where} `sample_size` {unet.get('sample_size')!r} (a UNet forward pass on {height}x{width} images)")
    scheduler_path = regular_file(folder, SCHEDULER_CONFIG, what="the scheduler configuration")
    check_schedule_size(read_json(scheduler_path), str(scheduler_path))
