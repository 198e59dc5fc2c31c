"""The `README.md` model card of a published pipeline: Hub metadata plus what was trained, how, and how to load it.

Everything is read from files, never from a live model, so a card can be written without torch: the pipeline
folder's configs and safetensors header, the training configuration saved beside it, and the evaluation report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import __version__
from .vocabulary import PIPELINE_MODULE, TRAINING_CONFIG_FILE

PAPER_URL = "https://arxiv.org/abs/2006.11239"
DEFAULT_LICENSE = "apache-2.0"
# Where `ddpm train` and `ddpm evaluate` leave their records, relative to the pipeline folder (or its parent).
TRAINING_CONFIG_FILES = (TRAINING_CONFIG_FILE,)
EVALUATION_REPORT = Path("evaluation") / "report.json"
# Hub ids of the data sets the presets are named after; the others have no canonical Hub copy.
DATASET_HUB_IDS = {"cifar10": "uoft-cs/cifar10", "mnist": "ylecun/mnist"}
DATASET_DESCRIPTIONS = {
    "cifar10": "CIFAR-10 (32x32 RGB, 50,000 training images)",
    "mnist": "MNIST (28x28 grey digits zero-padded to 32x32)",
    "digits": "scikit-learn's 8x8 digits (`sklearn.datasets.load_digits`, 1,797 grey images)",
    "celebahq": "CelebA-HQ at 256x256",
    "lsun": "LSUN at 256x256",
}
# Evaluation report keys, their names in the card and their model-index metric ids.
METRICS = (
    ("bits_per_dim", "NLL, variational bound (bits/dim, lower is better)", "bits_per_dim"),
    ("fid", "FID (lower is better)", "fid"),
    ("inception_score", "Inception score (higher is better)", "inception_score"),
)
# Further report entries worth showing (never `model` or other local paths of the evaluating machine).
REPORT_DETAILS = (
    ("bits_per_dim_sem", "bits/dim, standard error of the mean"),
    ("rate_bpd", "rate L_T + ... + L_1 (bits/dim)"),
    ("distortion_bpd", "distortion L_0 (bits/dim)"),
    ("num_images", "images in the bound"),
    ("inception_score_std", "Inception score, standard deviation"),
    ("num_samples", "generated samples (FID, IS)"),
    ("num_reference_images", "reference images (FID)"),
    ("sampler", "sampler"),
    ("sampling_steps", "sampling steps"),
)
# Training-configuration keys shown in the recipe table, in this order, with their names in the card.
RECIPE_KEYS = (
    ("preset", "preset"),
    ("dataset", "data set"),
    ("max_steps", "training steps"),
    ("learning_rate", "learning rate (Adam)"),
    ("batch_size", "batch size"),
    ("warmup_steps", "linear warmup steps"),
    ("grad_clip_norm", "gradient clipping (global norm)"),
    ("ema_decay", "EMA decay"),
    ("dropout", "dropout"),
    ("random_flip", "random horizontal flips"),
    ("mixed_precision", "mixed precision"),
    ("seed", "seed"),
)


def load_training_config(pipeline_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The training configuration saved with the pipeline (in its folder or the folder above), if any."""
    folder = Path(pipeline_dir)
    for candidate in (folder, folder.parent):
        for name in TRAINING_CONFIG_FILES:
            if (candidate / name).is_file():
                return json.loads((candidate / name).read_text())
    return None


def load_evaluation_report(pipeline_dir: str | os.PathLike, report: str | os.PathLike | None = None) -> dict | None:
    """The evaluation report `report`, else `evaluation/report.json` in the pipeline folder or the folder above."""
    if report is None:
        folder = Path(pipeline_dir)
        report = next((c / EVALUATION_REPORT for c in (folder, folder.parent) if (c / EVALUATION_REPORT).is_file()), None)
        if report is None:
            return None
    return read_evaluation_report(report)


def read_evaluation_report(report: str | os.PathLike) -> dict:
    """The JSON object in `report`, or a one-line `ValueError`/`FileNotFoundError` naming the file."""
    path = Path(report)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation report {report} does not exist" + (" (a folder)." if path.is_dir() else "."))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{report} is not valid JSON ({error}); pass the report.json `ddpm evaluate` wrote.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{report}: an evaluation report must be a JSON object, got {type(data).__name__}.")
    return data


def count_parameters(weights: Path) -> int:
    """The number of parameters in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(weights, framework="numpy") as file:
        for name in file.keys():
            count = 1
            for dim in file.get_slice(name).get_shape():
                count *= dim
            total += count
    return total


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the pipeline folder is incomplete.")
    return json.loads(path.read_text())


def _dataset_name(training_config: dict | None) -> str | None:
    """The data set's name: a preset's data set, a Hub id, or the last component of a local path (a card must
    not publish the trainer's file system)."""
    dataset = (training_config or {}).get("dataset")
    if not dataset and (training_config or {}).get("preset"):
        from .presets import PRESETS

        preset = PRESETS.get(training_config["preset"])
        dataset = preset.dataset if preset else None
    if not dataset:
        return None
    dataset = str(dataset)
    if os.path.exists(dataset) or dataset.startswith(("/", ".", "~")) or "\\" in dataset:
        return Path(dataset).name or None
    return dataset


def _dataset_hub_id(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    return dataset if "/" in dataset else DATASET_HUB_IDS.get(dataset)


def _eval_results(report: dict, dataset: str | None) -> list[EvalResult]:
    return [
        EvalResult(
            task_type="unconditional-image-generation",
            dataset_type=_dataset_hub_id(dataset) or dataset or "custom",
            dataset_name=DATASET_DESCRIPTIONS.get(dataset, dataset or "custom").split(" (")[0],
            metric_type=metric_id,
            metric_name=label.split(" (")[0],
            metric_value=float(report[key]),
        )
        for key, label, metric_id in METRICS
        if isinstance(report.get(key), (int, float))
    ]


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return f"`{value}`" if isinstance(value, (list, tuple, dict)) else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {name} | {_format(value)} |" for name, value in rows]
    return "\n".join(lines)


def _model_section(unet: dict, scheduler: dict, num_parameters: int, ema_decay: float | None, has_non_ema: bool) -> str:
    size = unet["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    attention = [i for i, block in enumerate(unet["down_block_types"]) if "Attn" in block]
    variance = scheduler.get("variance_type", "fixed_small")
    sigma = {"fixed_large": "beta_t", "fixed_small": "beta-tilde_t (the posterior variance)"}.get(variance, variance)
    rows = [
        ("network", f"`UNet2DModel`, {num_parameters:,} parameters"),
        ("weights", (f"exponential moving average, decay {ema_decay:g}" if ema_decay else "as saved")
         + ('; the raw weights as `variant="non_ema"`' if has_non_ema else "")),
        ("images", f"{height}x{width}, {unet['in_channels']} channel(s)"),
        ("channels per resolution", ", ".join(str(c) for c in unet["block_out_channels"])),
        ("residual blocks per resolution", unet["layers_per_block"]),
        ("self-attention at", ", ".join(f"{height // 2**i}x{width // 2**i}" for i in attention) or "none"),
        ("dropout", unet.get("dropout", 0.0)),
        ("diffusion steps T", scheduler["num_train_timesteps"]),
        ("noise schedule", f"{scheduler['beta_schedule']} betas {scheduler['beta_start']:g} .. {scheduler['beta_end']:g}"),
        ("network predicts", scheduler.get("prediction_type", "epsilon")),
        ("sampling variance sigma_t^2", f"{sigma} (`{variance}`)"),
    ]
    return "## Model\n\n" + _table(rows, ("property", "value"))


def _training_section(training_config: dict | None, dataset: str | None) -> str:
    if not training_config:
        return "## Training\n\nNo training configuration was saved with this pipeline."
    steps = training_config.get("max_steps")  # the pipeline is saved when training reaches it
    trained_on = DATASET_DESCRIPTIONS.get(dataset, f"`{dataset}`") if dataset else "its training images"
    lines = [
        "## Training",
        "",
        f"Trained on {trained_on}"
        + (f" for {steps:,} steps" if isinstance(steps, int) else "")
        + " with the paper's objective L_simple = E ||eps - eps_theta(x_t, t)||^2, t ~ U{1..T} (Algorithm 1).",
        "",
        _table([(label, dataset if key == "dataset" else training_config[key])
                for key, label in RECIPE_KEYS if training_config.get(key) is not None],
               ("setting", "value")),
    ]
    return "\n".join(lines)


def _evaluation_section(report: dict | None) -> str:
    if not report:
        return "## Evaluation\n\nNo evaluation report was supplied (`ddpm push --report PATH`)."
    rows = [(label, float(report[key])) for key, label, _ in METRICS if isinstance(report.get(key), (int, float))]
    rows += [(label, report[key]) for key, label in REPORT_DETAILS if report.get(key) is not None]
    table = _table(rows, ("metric", "value"))
    return ("## Evaluation\n\n" + table + "\n\nThe paper reports, for CIFAR-10: NLL <= 3.75 bits/dim (test), "
            "FID 3.17 and Inception score 9.46 (Table 1).")


def _usage_section(repo_id: str, has_onnx: bool) -> str:
    onnx = f"""
### ONNX Runtime, without PyTorch

```python
from huggingface_hub import snapshot_download
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

path = snapshot_download("{repo_id}", allow_patterns=["onnx/*"])
pipe = OnnxDDPMPipeline.from_pretrained(f"{{path}}/onnx")  # CUDA when usable, else CPU
images = pipe(batch_size=16, num_inference_steps=1000, seed=0).images
```
""" if has_onnx else ""
    return f"""## How to use

### Plain diffusers (no remote code)

The repository records stock classes, so diffusers alone loads it as a `DDPMPipeline`:

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}")
image = pipe(num_inference_steps=1000).images[0]
```

### The paper pipeline from this repository (remote code)

`{PIPELINE_MODULE}.py` and the files it imports are in this repository. With `trust_remote_code=True`
diffusers runs them and returns `DDPMPaperPipeline` (initial noise `latents`, step callbacks, progressive
generation, bits/dim). Read the files before you trust them.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "{repo_id}", custom_pipeline="{PIPELINE_MODULE}", trust_remote_code=True
)
```

### With ddpm-plugin installed (no remote code)

```python
import torch
from ddpm_plugin import DDPMPaperPipeline

pipe = DDPMPaperPipeline.from_pretrained("{repo_id}")
images = pipe(batch_size=16, generator=torch.manual_seed(0)).images
```
{onnx}"""


def model_card(
    pipeline_dir: str | os.PathLike,
    repo_id: str,
    *,
    report: dict | None = None,
    training_config: dict | None = None,
    grid_file: str | None = "samples.png",
    grid_caption: str | None = None,
    has_onnx: bool = False,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    r"""
    Write the model card of a saved pipeline.

    Args:
        pipeline_dir (`str` or `os.PathLike`):
            A folder written by [`DDPMPaperPipeline.save_pretrained`].
        repo_id (`str`):
            The Hub repository, `"user/name"`, used in the loading examples.
        report (`dict`, *optional*):
            An evaluation report with the float keys `bits_per_dim`, `fid` and `inception_score` (any subset).
            Its figures go into the card's body and, as `model-index`, into its metadata.
        training_config (`dict`, *optional*):
            The configuration the pipeline was trained with, as `ddpm train` saves it.
        grid_file (`str`, *optional*, defaults to `"samples.png"`):
            The repository path of a sample grid to show; `None` shows none.
        grid_caption (`str`, *optional*):
            The caption under the grid.
        has_onnx (`bool`, *optional*, defaults to `False`):
            Whether the repository carries an `onnx/` export; adds the ONNX Runtime example.
        license (`str`, *optional*, defaults to `"apache-2.0"`):
            A Hub license id.

    Returns:
        [`huggingface_hub.ModelCard`]: the card; `str(card)` is the `README.md` text.
    """
    folder = Path(pipeline_dir)
    model_index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    num_parameters = count_parameters(folder / "unet" / "diffusion_pytorch_model.safetensors")
    non_ema = folder / "unet" / "diffusion_pytorch_model.non_ema.safetensors"
    dataset = _dataset_name(training_config)
    model_name = repo_id.split("/")[-1]
    tags = ["diffusers", f"diffusers:{model_index['_class_name']}", "ddpm", "ddpm-plugin",
            "unconditional-image-generation", "safetensors"] + (["onnx"] if has_onnx else [])
    if dataset:
        tags.append(dataset)
    dataset_hub_id = _dataset_hub_id(dataset)
    eval_results = _eval_results(report, dataset) if report else []
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=tags,
        datasets=[dataset_hub_id] if dataset_hub_id else None,
        # model-index (the Hub's evaluation metadata) needs a model name; without results it would be noise.
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    grid = ""
    if grid_file:
        grid = f"![Samples]({grid_file})\n\n*{grid_caption or 'Samples from this pipeline.'}*\n\n"
    trained_on = f" on {DATASET_DESCRIPTIONS.get(dataset, f'`{dataset}`')}" if dataset else ""
    intro = " ".join([
        f"A denoising diffusion probabilistic model ([Ho, Jain & Abbeel 2020]({PAPER_URL})) trained{trained_on}",
        f"with ddpm-plugin {__version__}"
        + (", which implements the paper's training recipe (settings below)." if training_config else "."),
        f"It generates images from noise by ancestral sampling over T = {scheduler['num_train_timesteps']} steps",
        "(Algorithm 2); fewer steps work with a `DDIMScheduler` built from the same scheduler config.",
    ])
    body = f"""
# {model_name}

{intro}

{grid}{_model_section(unet, scheduler, num_parameters, (training_config or {}).get("ema_decay"), non_ema.is_file())}

{_training_section(training_config, dataset)}

{_evaluation_section(report)}

{_usage_section(repo_id, has_onnx)}
## Citation

```bibtex
@inproceedings{{ho2020denoising,
  title     = {{Denoising Diffusion Probabilistic Models}},
  author    = {{Ho, Jonathan and Jain, Ajay and Abbeel, Pieter}},
  booktitle = {{Advances in Neural Information Processing Systems}},
  year      = {{2020}}
}}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
