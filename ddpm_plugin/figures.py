"""The paper's figures from the pipeline's outputs: Fig. 5 (rate-distortion), 6 (progression), 7 (reconstruction
from a shared x_t) and 8-9 (interpolation).

The rate-distortion curve is a matplotlib figure drawn without pyplot (the Agg canvas, no display needed); the
image figures are `PIL.Image` grids from `ddpm_plugin.images.make_grid`, upscaled by nearest neighbour.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .images import make_grid, snapshot_grid
from .pipelines.pipeline_ddpm_paper import (
    InterpolationOutput,
    ProgressiveGenerationOutput,
    RateDistortionOutput,
    ReconstructionOutput,
)


def plot_rate_distortion(curve: RateDistortionOutput, title: str | None = None) -> Figure:
    """Paper Fig. 5: distortion (RMSE, 0..255) and rate (bits/dim) against reverse-process steps, and distortion
    against rate. Reverse steps run from 0 (x_T) to T (x_0)."""
    num_timesteps = len(curve.timesteps)
    reverse_steps = num_timesteps - np.asarray(curve.timesteps)
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    distortion_ax, rate_ax, tradeoff_ax = figure.subplots(1, 3)
    distortion_ax.plot(reverse_steps, curve.distortion_rmse)
    distortion_ax.set(xlabel="reverse process steps (T - t)", ylabel="distortion (RMSE [0, 255])")
    rate_ax.plot(reverse_steps, curve.rate_bpd)
    rate_ax.set(xlabel="reverse process steps (T - t)", ylabel="rate (bits/dim)")
    tradeoff_ax.plot(curve.rate_bpd, curve.distortion_rmse)
    tradeoff_ax.set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE [0, 255])")
    figure.suptitle(
        title or f"rate {curve.total_rate_bpd:.2f} + distortion {curve.total_distortion_bpd:.2f} "
        f"= {curve.total_rate_bpd + curve.total_distortion_bpd:.2f} bits/dim"
    )
    for ax in (distortion_ax, rate_ax, tradeoff_ax):
        ax.grid(alpha=0.3)
    return figure


def progression_grid(progression: ProgressiveGenerationOutput, scale: int = 4) -> Image.Image:
    """Paper Fig. 6: one row of x_t and one row of the predicted x_0 per image, snapshots left to right (t falling)."""
    return snapshot_grid(progression.x_t, progression.pred_original_sample, scale=scale)


def reconstruction_grid(
    reconstruction: ReconstructionOutput, originals: np.ndarray | None = None, scale: int = 4
) -> Image.Image:
    """Paper Fig. 7: per image one row of [x_0 (when given), the shared x_t, samples of p(x_0 | x_t)...]."""
    columns = [reconstruction.x_t[:, None], reconstruction.images]
    if originals is not None:
        originals = np.asarray(originals)
        originals = originals[..., None] if originals.ndim == 3 else originals
        originals = originals.astype(np.float64) / 255.0 if originals.dtype == np.uint8 else originals
        columns.insert(0, originals[:, None])
    rows = np.concatenate(columns, axis=1)  # [N, 1 (+1) + num_samples, H, W, C]
    return make_grid(rows.reshape(-1, *rows.shape[2:]), nrow=rows.shape[1], scale=scale)


def interpolation_strip(interpolations: InterpolationOutput | Sequence[InterpolationOutput], scale: int = 4) -> Image.Image:
    """Paper Fig. 8-9: one row per interpolation (e.g. one per t), lambda = 0..1 left to right."""
    if isinstance(interpolations, InterpolationOutput):
        interpolations = [interpolations]
    lengths = {len(item.lambdas) for item in interpolations}
    if len(lengths) != 1:
        raise ValueError(f"every interpolation needs the same number of lambdas, got {sorted(lengths)}.")
    images = np.concatenate([item.images for item in interpolations])
    return make_grid(images, nrow=lengths.pop(), scale=scale)


def save_figure(figure: Figure | Image.Image, path: str | os.PathLike) -> str:
    """Write a figure as PNG and return the path."""
    if isinstance(figure, Figure):
        figure.savefig(path, dpi=120)
    else:
        figure.save(path)
    return str(path)
