"""Measure a trained pipeline as the paper does and write a JSON report with PNG figures (`ddpm evaluate`).

Metrics: `bpd` (the variational bound in bits/dim on test images, Table 2), `rd` (its rate-distortion split and
curve, Fig. 5 / Table 4: the same pass as `bpd`), `fid` and `is` (Table 1, on `num_samples` generated images).
Figures: rate-distortion (with `bpd`/`rd`), progressive generation (Fig. 6), reconstruction from a shared x_t
(Fig. 7) and interpolation at several t (Fig. 9).

The report's top-level `bits_per_dim`, `fid` and `inception_score` are plain floats (model cards read them).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .figures import (
    interpolation_strip,
    plot_rate_distortion,
    progression_grid,
    reconstruction_grid,
    save_figure,
)
from .images import to_uint8
from .metrics import DEFAULT_NUM_SAMPLES, ImageMetrics
from .pipelines.pipeline_ddpm_paper import DDPMPaperPipeline, RateDistortionOutput

EVALUATION_METRICS = ("bpd", "rd", "fid", "is")
# Steps t of the interpolation rows (Fig. 9 uses 0..1000 in steps of 250).
INTERPOLATION_TIMESTEPS = (0, 250, 500, 750, 999)
RECONSTRUCTION_TIMESTEP = 500  # Fig. 7 shares x_t at t = 500 of 1000
FIGURE_IMAGES = 4  # images per progression/reconstruction figure


@dataclass
class EvaluationConfig:
    """What `evaluate` measures, on which data, and where it writes."""

    model: str  # pipeline folder
    dataset: str | None = None  # test images: an .npz, a folder, digits, mnist, a datasets name (see ddpm_plugin.data)
    metrics: tuple[str, ...] = ("bpd", "rd")  # any of bpd, rd, fid, is
    num_images: int | None = None  # test images for bits/dim, drawn at random with `seed` (None: all)
    num_samples: int = DEFAULT_NUM_SAMPLES  # generated images for FID/IS (paper: 50,000); also the reference count
    batch_size: int = 64  # UNet inputs per pass
    num_inference_steps: int = 1000  # sampling steps of the FID/IS samples
    scheduler: str = "ddpm"  # sampler of the FID/IS samples: ddpm or ddim
    seed: int = 0  # the test subset, the bound's noise, the samples
    output: str = "report.json"  # the JSON report
    figures_dir: str | None = None  # PNG figures (default: the report's folder)
    figures: bool = True  # write progression, reconstruction and interpolation figures
    figure_steps: int = 1000  # sampling steps of the figures (paper: 1000)
    inception_weights: str | None = None  # NVIDIA's TorchScript inception-2015-12-05.pt (or $DDPM_INCEPTION_WEIGHTS)

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(EVALUATION_METRICS)
        if unknown:
            raise ValueError(f"`metrics` must be some of {list(EVALUATION_METRICS)}, got {sorted(unknown)}.")
        if self.dataset is None and {"bpd", "rd", "fid"} & set(self.metrics):
            raise ValueError("`dataset` is needed for bpd, rd and fid (test images or FID's reference images).")
        for name in ("num_samples", "batch_size", "num_inference_steps", "figure_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.num_images is not None and self.num_images < 1:
            raise ValueError(f"`num_images` must be a positive integer or None, got {self.num_images!r}.")


def dataset_images(dataset: str, pipe: DDPMPaperPipeline, num_images: int | None, seed: int) -> tuple[np.ndarray, int]:
    """`num_images` uint8 NHWC images of `dataset` drawn without replacement with `seed` (all, in order, when None),
    zero-padded to the model's size as in training, and the size of the whole data set."""
    from .data import load_image_dataset

    _, channels, height, _ = pipe.image_shape(1)
    images = load_image_dataset(dataset, height, channels)
    if num_images is None or num_images >= len(images):
        indices = torch.arange(len(images))
    else:
        indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_images].sort().values
    return torch.stack([images[int(i)] for i in indices]).permute(0, 2, 3, 1).numpy(), len(images)


def generate_samples(
    pipe: DDPMPaperPipeline, num_samples: int, batch_size: int, num_inference_steps: int, seed: int
) -> Iterator[np.ndarray]:
    """Batches of uint8 NHWC samples, `num_samples` in all."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        images = pipe(batch_size=count, num_inference_steps=num_inference_steps, generator=generator, output_type="np").images
        yield to_uint8(images)


def bound_report(pipe: DDPMPaperPipeline, images: np.ndarray, config: EvaluationConfig) -> tuple[dict[str, Any], RateDistortionOutput]:
    """The bits/dim entries of the report and the rate-distortion curve, from one pass."""
    bound = pipe.bits_per_dim(images, batch_size=config.batch_size, generator=torch.Generator().manual_seed(config.seed))
    curve = RateDistortionOutput(
        timesteps=np.arange(bound.terms_bpd.shape[1]), rate_bpd=bound.cumulative_rate_bpd,
        distortion_rmse=bound.distortion_rmse, total_rate_bpd=float(bound.rate_bpd.mean()),
        total_distortion_bpd=float(bound.decoder_bpd.mean()),
    )
    report = {
        "bits_per_dim": float(bound.total_bpd.mean()),
        "bits_per_dim_sem": float(bound.total_bpd.std(ddof=1) / math.sqrt(len(images))) if len(images) > 1 else None,
        "rate_bpd": curve.total_rate_bpd,
        "distortion_bpd": curve.total_distortion_bpd,
        "prior_bpd": float(bound.prior_bpd.mean()),
        "dims_per_image": int(np.prod(images.shape[1:])),
        "num_timesteps": int(bound.terms_bpd.shape[1]),
    }
    if "rd" in config.metrics:
        report["rate_distortion"] = {
            "rate_bpd": bound.cumulative_rate_bpd.tolist(),
            "distortion_rmse": bound.distortion_rmse.tolist(),
            "terms_bpd": bound.terms_bpd.mean(axis=0).tolist(),
        }
    return report, curve


def sample_quality_report(pipe: DDPMPaperPipeline, config: EvaluationConfig, metrics: ImageMetrics) -> dict[str, Any]:
    """FID against the data set and the Inception Score of `num_samples` generated images."""
    from diffusers import DDIMScheduler

    num_reference = 0
    if "fid" in metrics.metrics:
        reference, _ = dataset_images(config.dataset, pipe, config.num_samples, config.seed)
        for start in range(0, len(reference), config.batch_size):
            metrics.update_real(reference[start : start + config.batch_size])
        num_reference = len(reference)
    sampler = pipe
    if config.scheduler == "ddim":
        sampler = DDPMPaperPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    elif config.scheduler != "ddpm":
        raise ValueError(f"`scheduler` must be 'ddpm' or 'ddim', got {config.scheduler!r}.")
    for samples in generate_samples(sampler, config.num_samples, config.batch_size, config.num_inference_steps, config.seed):
        metrics.update_fake(samples)
    return {**metrics.compute(), "num_samples": config.num_samples, "num_reference_images": num_reference,
            "sampling_steps": config.num_inference_steps, "sampler": config.scheduler}


def write_figures(pipe: DDPMPaperPipeline, images: np.ndarray | None, config: EvaluationConfig, folder: Path) -> dict[str, str]:
    """Progression (Fig. 6), and with data, reconstruction (Fig. 7) and interpolation (Fig. 9) PNGs."""
    steps, paths = config.figure_steps, {}
    generator = torch.Generator().manual_seed(config.seed)
    progression = pipe.progressive_generation(batch_size=FIGURE_IMAGES, num_inference_steps=steps,
                                              every=max(1, steps // 10), generator=generator)
    paths["progression"] = save_figure(progression_grid(progression), folder / "progression.png")
    if images is not None and len(images) >= 2:
        # Spread over the data (sets sorted by class, as MNIST, then show different classes).
        originals = images[np.linspace(0, len(images) - 1, min(FIGURE_IMAGES, len(images))).round().astype(int)]
        reconstruction = pipe.reconstruct(originals, timestep=RECONSTRUCTION_TIMESTEP, num_samples=FIGURE_IMAGES,
                                          generator=generator, num_inference_steps=steps)
        paths["reconstruction"] = save_figure(reconstruction_grid(reconstruction, originals=originals),
                                              folder / "reconstruction.png")
        rows = [pipe.interpolate(originals[0], originals[-1], timestep=t, generator=torch.Generator().manual_seed(config.seed),
                                 num_inference_steps=steps) for t in INTERPOLATION_TIMESTEPS]
        paths["interpolation"] = save_figure(interpolation_strip(rows), folder / "interpolation.png")
    return paths


def evaluate(
    config: EvaluationConfig,
    pipe: DDPMPaperPipeline | None = None,
    feature_extractor: torch.nn.Module | None = None,
    logits_extractor: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Run the metrics and figures of `config` and write the JSON report; returns the report.

    `feature_extractor` / `logits_extractor` replace the Inception network of FID / IS (see `ddpm_plugin.metrics`).
    """
    from .sampling import load_pipeline

    metrics = None
    if {"fid", "is"} & set(config.metrics):  # before any long computation: the Inception network may be missing
        names = tuple({"fid": "fid", "is": "inception_score"}[m] for m in config.metrics if m in ("fid", "is"))
        metrics = ImageMetrics(names, feature_extractor=feature_extractor, logits_extractor=logits_extractor,
                               inception_weights=config.inception_weights)
    pipe = pipe if pipe is not None else load_pipeline(config.model)
    output = Path(config.output)
    folder = Path(config.figures_dir) if config.figures_dir else output.parent
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": str(config.model), "dataset": config.dataset, "metrics": list(config.metrics),
                              "seed": config.seed}
    wall_time: dict[str, float] = {}
    figures: dict[str, str] = {}
    images = None
    if config.dataset is not None and ({"bpd", "rd"} & set(config.metrics) or config.figures):
        images, report["dataset_size"] = dataset_images(config.dataset, pipe, config.num_images, config.seed)
    if {"bpd", "rd"} & set(config.metrics):
        started = time.perf_counter()
        bound, curve = bound_report(pipe, images, config)
        report.update(num_images=len(images), **bound)
        wall_time["bound"] = time.perf_counter() - started
        figures["rate_distortion"] = save_figure(plot_rate_distortion(curve), folder / "rate_distortion.png")
    if metrics is not None:
        started = time.perf_counter()
        report.update(sample_quality_report(pipe, config, metrics))
        wall_time["fid_is"] = time.perf_counter() - started
    if config.figures:
        started = time.perf_counter()
        figures.update(write_figures(pipe, images, config, folder))
        wall_time["figures"] = time.perf_counter() - started
    report.update(figures=figures, wall_time_s=wall_time, config=asdict(config))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    return report


def summary_table(report: dict[str, Any]) -> str:
    """The headline numbers of a report as a Markdown table."""
    rows = [("bits/dim (bound)", "bits_per_dim"), ("rate (bits/dim)", "rate_bpd"), ("distortion (bits/dim)", "distortion_bpd"),
            ("FID", "fid"), ("Inception Score", "inception_score")]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {report[key]:.4f} |" for label, key in rows if report.get(key) is not None]
    return "\n".join(lines)
