"""Measure a trained pipeline as the paper does and write a JSON report with PNG figures (`ddpm evaluate`).

Metrics: `bpd` (the variational bound in bits/dim on test images, Table 2), `rd` (its rate-distortion split and
curve, Fig. 5 / Table 4: the same pass as `bpd`), `fid`, `kid` and `is` (Table 1, on `num_samples` generated images, drawn
here or read from the shards of `ddpm sample --output-dir`: the same images for the same seed, steps and batch size).
FID's reference statistics (mu, sigma) can be saved once (`fid_stats`) and reused.
Figures: rate-distortion (with `bpd`/`rd`), progressive generation (Fig. 6), reconstruction from a shared x_t
(Fig. 7) and interpolation at several t (Fig. 9).

The report's top-level `bits_per_dim`, `fid`, `kid` and `inception_score` are plain floats (model cards read them);
`inception` names FID's and KID's network, its file's SHA-256 and its number of features.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import dataset_images
from .figures import (
    interpolation_strip,
    plot_rate_distortion,
    progression_grid,
    reconstruction_grid,
    save_figure,
)
from .metrics import DEFAULT_NUM_SAMPLES, FidStatistics, ImageMetrics
from .pipelines.pipeline_ddpm_paper import DDPMPaperPipeline, RateDistortionOutput
from .sample_shards import SampleFolder, read_sample_folder
from .sampling import ImageSampler, TorchImageSampler, with_scheduler
from .trust import write_json
from .vocabulary import Sampler

EVALUATION_METRICS = ("bpd", "rd", "fid", "kid", "is")
IMAGE_METRICS = {"fid": "fid", "kid": "kid", "is": "inception_score"}  # evaluation name -> ImageMetrics name
# Steps t of the interpolation rows (Fig. 9 uses 0..1000 in steps of 250).
INTERPOLATION_TIMESTEPS = (0, 250, 500, 750, 999)
RECONSTRUCTION_TIMESTEP = 500  # Fig. 7 shares x_t at t = 500 of 1000
FIGURE_IMAGES = 4  # images per progression/reconstruction figure
# Bits/dim on the test images (Table 2), FID against the training images (Table 1), as the paper; data sets
# without splits (folders, .npz files) are used whole.
BOUND_SPLIT = "test"
FID_REFERENCE_SPLIT = "train"


@dataclass
class EvaluationConfig:
    """What `evaluate` measures, on which data, and where it writes."""

    model: str | None = None  # pipeline folder (None: the model of `samples`)
    # An .npz, a folder, digits, mnist, a datasets name (see ddpm_plugin.data); of digits and mnist, the test split
    # for bits/dim and the figures, the training split for FID's reference images.
    dataset: str | None = None
    metrics: tuple[str, ...] = ("bpd", "rd")  # any of bpd, rd, fid, kid, is
    num_images: int | None = None  # test images for bits/dim, drawn at random with `seed` (None: all)
    num_samples: int | None = None  # images for FID/IS (None: 50,000 as the paper, or all of `samples`); also the reference count
    samples: str | None = None  # a `ddpm sample --output-dir` folder: FID/IS score its images instead of sampling
    fid_stats: str | None = None  # FID reference statistics (.npz of mu, sigma): read if it exists, else computed and saved
    batch_size: int = 64  # UNet inputs per pass
    num_inference_steps: int = 1000  # sampling steps of the FID/IS samples
    scheduler: Sampler = "ddpm"  # sampler of the FID/IS samples: ddpm or ddim
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
        if self.dataset is None and {"bpd", "rd"} & set(self.metrics):
            raise ValueError("`dataset` is needed for bpd and rd (the test images).")
        if self.dataset is None and "fid" in self.metrics and not (self.fid_stats and Path(self.fid_stats).is_file()):
            raise ValueError("`dataset` (FID's reference images) or an existing `fid_stats` file is needed for fid.")
        if self.dataset is None and "kid" in self.metrics:
            raise ValueError("`dataset` (KID's reference images; `fid_stats` holds FID's statistics only) is needed for kid.")
        if self.fid_stats is not None and Path(self.fid_stats).suffix != ".npz":
            raise ValueError(f"`fid_stats` must name an .npz file, got {self.fid_stats!r}.")
        if self.samples is not None and not set(IMAGE_METRICS) & set(self.metrics):
            raise ValueError("`samples` are scored by fid, kid and is; add one of them to `metrics`.")
        if self.model is None and self.samples is None:
            raise ValueError("`model` is needed (or `samples`, whose manifest names its model).")
        if Path(self.output).is_dir():
            raise ValueError(f"`output` {self.output} is a folder; give the JSON file to write, such as {Path(self.output) / 'report.json'}.")
        for name in ("batch_size", "num_inference_steps", "figure_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("num_images", "num_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")


def generate_samples(sampler: ImageSampler, num_samples: int, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of uint8 NHWC samples 0..num_samples-1 of `sampler` (the images `ddpm sample` draws with the same
    seed, sampler, steps and batch size)."""
    with tqdm(total=num_samples, unit="img", desc="sampling") as progress:
        for start in range(0, num_samples, batch_size):
            images = sampler(start, min(batch_size, num_samples - start))
            progress.update(len(images))
            yield images


def bound_report(pipe: DDPMPaperPipeline, images: np.ndarray, config: EvaluationConfig) -> tuple[dict[str, Any], RateDistortionOutput]:
    """The bits/dim entries of the report and the rate-distortion curve, from one pass."""
    bound = pipe.bits_per_dim(images, batch_size=config.batch_size, generator=torch.Generator().manual_seed(config.seed))
    curve = bound.rate_distortion()
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
            "rate_bpd": curve.rate_bpd.tolist(),
            "distortion_rmse": curve.distortion_rmse.tolist(),
            "terms_bpd": bound.terms_bpd.mean(axis=0).tolist(),
        }
    return report, curve


def reference_statistics(config: EvaluationConfig, metrics: ImageMetrics, image_shape: tuple[int, int, int], num_samples: int) -> int:
    """FID's and KID's real side. FID's is loaded from `fid_stats` when it exists, else computed from up to
    `num_samples` images of the data set (and saved to `fid_stats` when given); KID always needs the images (the
    file holds FID's mu and sigma only). Returns the number of FID's reference images (else KID's)."""
    loaded = None
    if "fid" in metrics.metrics and config.fid_stats and Path(config.fid_stats).is_file():
        loaded = FidStatistics.load(config.fid_stats)
        metrics.load_real_statistics(loaded)
        if "kid" not in metrics.metrics:
            return loaded.num_images
    reference, _ = dataset_images(config.dataset, image_shape, num_samples, config.seed, split=FID_REFERENCE_SPLIT)
    for start in tqdm(range(0, len(reference), config.batch_size), desc="reference images", unit="batch"):
        metrics.update_real(reference[start : start + config.batch_size])
    if config.fid_stats and loaded is None and "fid" in metrics.metrics:
        Path(config.fid_stats).parent.mkdir(parents=True, exist_ok=True)
        metrics.real_statistics().save(config.fid_stats)
    return len(reference) if loaded is None else loaded.num_images


def sample_quality_report(config: EvaluationConfig, metrics: ImageMetrics, pipe: DDPMPaperPipeline | None,
                          samples: SampleFolder | None) -> dict[str, Any]:
    """FID against the data set and the Inception Score of the checked sample folder `samples`, or of
    `num_samples` images drawn from `pipe` as `ddpm sample --backend pytorch` draws them. `num_samples` in the
    report is the number of images scored."""
    if samples is not None:
        run = samples.manifest["run"]
        num_samples = config.num_samples or samples.num_images
        height, width, channels = run["image_shape"]
        image_shape, batches = (channels, height, width), samples.batches(num_samples)
        sampling = {"sampling_steps": run["num_inference_steps"], "sampler": run["scheduler"], "backend": run["backend"],
                    "samples": str(config.samples)}
    else:
        num_samples = config.num_samples or DEFAULT_NUM_SAMPLES
        sampler = TorchImageSampler(with_scheduler(pipe, config.scheduler), config.num_inference_steps, config.seed)
        image_shape, batches = sampler.image_shape, generate_samples(sampler, num_samples, config.batch_size)
        sampling = {"sampling_steps": config.num_inference_steps, "sampler": config.scheduler, "backend": "pytorch"}
    features = {"fid", "kid"} & set(metrics.metrics)
    num_reference = reference_statistics(config, metrics, image_shape, num_samples) if features else 0
    scored = 0
    for images in batches:
        metrics.update_fake(images)
        scored += len(images)
    network = {"inception": metrics.network_info} if features else {}
    return {**metrics.compute(), "num_samples": scored, "num_reference_images": num_reference, **sampling, **network}


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
    if set(IMAGE_METRICS) & set(config.metrics):  # before any long computation: the Inception network may be missing
        names = tuple(IMAGE_METRICS[m] for m in config.metrics if m in IMAGE_METRICS)
        metrics = ImageMetrics(names, feature_extractor=feature_extractor, logits_extractor=logits_extractor,
                               inception_weights=config.inception_weights)
    samples = read_sample_folder(config.samples) if config.samples is not None else None
    model = config.model or (samples.manifest["model"] if samples is not None else None)
    if pipe is None and ({"bpd", "rd"} & set(config.metrics) or config.figures or config.samples is None):
        pipe = load_pipeline(model)
    output = Path(config.output)
    folder = Path(config.figures_dir) if config.figures_dir else output.parent
    report: dict[str, Any] = {"model": str(model), "dataset": config.dataset, "metrics": list(config.metrics),
                              "seed": config.seed}
    wall_time: dict[str, float] = {}
    figures: dict[str, str] = {}
    images = None
    if config.dataset is not None and ({"bpd", "rd"} & set(config.metrics) or config.figures):
        images, report["dataset_size"] = dataset_images(config.dataset, pipe.image_shape(1)[1:], config.num_images,
                                                        config.seed, split=BOUND_SPLIT)
        report["dataset_split"] = BOUND_SPLIT
    if {"bpd", "rd"} & set(config.metrics):
        started = time.perf_counter()
        bound, curve = bound_report(pipe, images, config)
        report.update(num_images=len(images), **bound)
        wall_time["bound"] = time.perf_counter() - started
        if config.figures:
            folder.mkdir(parents=True, exist_ok=True)
            figures["rate_distortion"] = save_figure(plot_rate_distortion(curve), folder / "rate_distortion.png")
    if metrics is not None:
        started = time.perf_counter()
        report.update(sample_quality_report(config, metrics, pipe, samples))
        wall_time["fid_is"] = time.perf_counter() - started
    if config.figures:
        started = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        figures.update(write_figures(pipe, images, config, folder))
        wall_time["figures"] = time.perf_counter() - started
    report.update(figures=figures, wall_time_s=wall_time, config=asdict(config))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, report)
    return report


def summary_table(report: dict[str, Any]) -> str:
    """The headline numbers of a report as a Markdown table."""
    rows = [("bits/dim (bound)", "bits_per_dim"), ("rate (bits/dim)", "rate_bpd"), ("distortion (bits/dim)", "distortion_bpd"),
            ("FID", "fid"), ("KID", "kid"), ("Inception Score", "inception_score")]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {report[key]:.4f} |" for label, key in rows if report.get(key) is not None]
    return "\n".join(lines)
