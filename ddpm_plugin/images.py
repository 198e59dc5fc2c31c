"""Image grids for samples, figures and the demo (NumPy and Pillow only)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] floats in [0, 1] (or uint8) to uint8."""
    if images.dtype == np.uint8:
        return images
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


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
