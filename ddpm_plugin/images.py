"""Images in NumPy for samples, figures, the ONNX Runtime sampler and the demo: model space to pixels, the
denoising snapshots of paper Fig. 6, and grids (NumPy and Pillow only: the torch-free sampler imports it)."""

from __future__ import annotations

import math
from typing import Collection

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] floats in [0, 1] (or uint8) to uint8."""
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def to_image(sample: np.ndarray) -> np.ndarray:
    """A batch x in [-1, 1] (NCHW, model space) as NHWC float32 images in [0, 1]: (x + 1) / 2, clipped."""
    return np.clip(np.asarray(sample, dtype=np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil_images(images: np.ndarray) -> list[Image.Image]:
    """NHWC images in [0, 1] (or uint8) as PIL images, gray ("L") for one channel."""
    pixels = to_uint8(np.asarray(images))
    if pixels.shape[-1] == 1:
        return [Image.fromarray(image[..., 0], mode="L") for image in pixels]
    return [Image.fromarray(image) for image in pixels]


def every_k_steps(num_inference_steps: int, every: int) -> set[int]:
    """Step indices i (0-based) after every `every` steps, and the last one."""
    return {i for i in range(num_inference_steps) if (i + 1) % every == 0 or i + 1 == num_inference_steps}


def evenly_spaced_steps(num_inference_steps: int, count: int) -> set[int]:
    """`count` step indices (at most one per step) spread evenly from the first step to the last, both kept."""
    count = min(count, num_inference_steps)
    return set(np.linspace(0, num_inference_steps - 1, count).round().astype(int).tolist())


class SnapshotRecorder:
    """The denoising progression (paper Fig. 6) of a NumPy sampling loop: called after each step as
    `recorder(i, t, x_t, pred_original_sample)` with NCHW arrays in [-1, 1], it keeps x_t and the predicted x_0
    as NHWC images in [0, 1] at the step indices `steps`."""

    def __init__(self, steps: Collection[int]) -> None:
        self.steps = steps
        self.x_t: list[np.ndarray] = []
        self.pred_original_sample: list[np.ndarray] = []
        self.timesteps: list[int] = []

    def __call__(self, i: int, t: int, x_t: np.ndarray, pred_original_sample: np.ndarray) -> None:
        if i in self.steps:
            self.x_t.append(to_image(x_t))
            self.pred_original_sample.append(to_image(pred_original_sample))
            self.timesteps.append(int(t))

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """x_t and the predicted x_0 of every snapshot, each `(num_snapshots, batch, height, width, channels)`."""
        return np.stack(self.x_t), np.stack(self.pred_original_sample)


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1, scale: int = 1) -> Image.Image:
    """Tile [N, H, W, C] images into one picture, `nrow` per row, upscaled `scale` times by nearest neighbour
    so that tiny images keep crisp pixels."""
    images = to_uint8(np.asarray(images))
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for k in range(n):
        row, col = divmod(k, nrow)
        y, x = padding + row * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[k]
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def snapshot_grid(
    x_t: np.ndarray, pred_original_sample: np.ndarray, scale: int = 1, max_images: int | None = None
) -> Image.Image:
    """The denoising progression (paper Fig. 6) from snapshots [S, B, H, W, C]: for each image one row of x_t and
    one row of the predicted x_0, snapshots left to right (t falling); at most `max_images` images."""
    if x_t.shape != pred_original_sample.shape or x_t.ndim != 5:
        raise ValueError(f"snapshots must both be [S, B, H, W, C], got {x_t.shape} and {pred_original_sample.shape}.")
    num_snapshots = x_t.shape[0]
    rows = np.stack([x_t, pred_original_sample], axis=1)[:, :, :max_images]  # [S, 2, B, H, W, C]
    rows = rows.transpose(2, 1, 0, 3, 4, 5).reshape(-1, *x_t.shape[2:])  # image-major rows of S
    return make_grid(rows, nrow=num_snapshots, scale=scale)
