"""The bundled pipelines: the 28x28 MNIST model (the default) and the 8x8 digits model (fast tests). Each is small,
safetensors only, loads three ways, carries an ONNX export made from its very weights, and draws digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_plugin.bundled import BUNDLED_MODEL, BUNDLED_MODELS, DIGITS_MODEL, MNIST_MODEL, resolve_model

CONFIDENT = 0.9  # a sample counts as a recognisable digit when the classifier gives one class this probability


def pipeline_sources() -> dict[str, Path]:
    """The files `DDPMPaperPipeline.save_pretrained` copies into a folder, by name."""
    from diffusers.utils.dynamic_modules_utils import get_relative_import_files

    from ddpm_plugin.pipelines import pipeline_ddpm_paper

    files = [pipeline_ddpm_paper.__file__, *get_relative_import_files(pipeline_ddpm_paper.__file__)]
    return {Path(file).name: Path(file) for file in files}


@pytest.mark.parametrize("folder", BUNDLED_MODELS.values(), ids=BUNDLED_MODELS)
def test_bundled_models_load_as_remote_code_offline(folder, tmp_path):
    """The third way: `custom_pipeline="pipeline_ddpm_paper"` finds the code in the folder, with no Hub access."""
    code = textwrap.dedent(f"""
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, custom_pipeline="pipeline_ddpm_paper",
                                                 trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        print(type(pipe).__name__, pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    size = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
    assert f"DDPMPaperPipeline (1, {size}, {size}, 1)" in result.stdout


@pytest.mark.parametrize("folder", BUNDLED_MODELS.values(), ids=BUNDLED_MODELS)
def test_bundled_models_are_small_safetensors_with_stock_classes(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20_000_000  # weights and ONNX export together
    weights = [p.relative_to(folder).as_posix() for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pkl")]
    assert weights == ["unet/diffusion_pytorch_model.safetensors"]  # EMA weights only
    # The pipeline's code, as `save_pretrained` writes it, for `custom_pipeline=`: exactly the package's sources.
    sources = pipeline_sources()
    assert sorted(p.name for p in files if p.suffix == ".py") == sorted(sources)
    assert all((folder / name).read_bytes() == path.read_bytes() for name, path in sources.items())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    onnx = json.loads((folder / "onnx" / "ddpm_onnx.json").read_text())
    assert onnx["source_model"] == ".."


def test_the_mnist_model_is_the_default_and_names_resolve():
    assert BUNDLED_MODEL == MNIST_MODEL == resolve_model(None) == resolve_model("mnist")
    assert resolve_model("digits") == DIGITS_MODEL
    config = json.loads((MNIST_MODEL / "unet" / "config.json").read_text())
    assert config["sample_size"] == 28 and config["in_channels"] == 1


def test_mnist_model_loads_three_ways_and_its_export_matches_its_weights():
    """Stock diffusers, DDPMPaperPipeline, and OnnxDDPMPipeline (whose eps must equal the PyTorch UNet's)."""
    from diffusers import DDPMPipeline, DiffusionPipeline

    from ddpm_plugin import DDPMPaperPipeline
    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

    stock = DiffusionPipeline.from_pretrained(MNIST_MODEL)
    assert type(stock) is DDPMPipeline and stock.unet.dtype == torch.float32  # float16 on disk, float32 loaded
    paper = DDPMPaperPipeline.from_pretrained(MNIST_MODEL)
    onnx = OnnxDDPMPipeline.from_pretrained(MNIST_MODEL, provider="cpu", num_threads=1)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28), dtype=np.float32)
    t = np.array([0, 400, 999])
    (eps_onnx,) = onnx.session.run(None, {"sample": x, "timestep": t})
    with torch.no_grad():
        eps_torch = paper.unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    assert np.abs(eps_torch).max() > 0.5
    np.testing.assert_allclose(eps_onnx, eps_torch, atol=1e-4, rtol=0)


def test_ddpm_sample_defaults_to_the_bundled_model(tmp_path):
    from PIL import Image

    result = subprocess.run([sys.executable, "-m", "ddpm_plugin.cli", "sample", "--num-images", "2", "--steps", "2",
                             "--scheduler", "ddim", "--output", str(tmp_path / "grid.png")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "grid.png").size[0] >= 2 * 28


def test_mnist_samples_are_recognised_by_the_digit_classifier():
    """A quick check (DDIM 20 steps, 32 images, ONNX Runtime); benchmarks/mnist_quality.py measures the full picture."""
    from ddpm_plugin.classifier import classify, load_classifier
    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
    from ddpm_plugin.images import to_uint8

    pipe = OnnxDDPMPipeline.from_pretrained(MNIST_MODEL, provider="cpu", num_threads=1)
    images = pipe(batch_size=32, num_inference_steps=20, scheduler="ddim", seed=0, progress_bar=False).images
    _, probabilities = classify(load_classifier(), to_uint8(images)[..., 0])
    confidence, classes = probabilities.max(1), np.bincount(probabilities.argmax(1), minlength=10)
    print(f"\nmean confidence {confidence.mean():.3f}; confident {(confidence > CONFIDENT).mean():.2f}; classes {classes.tolist()}")
    assert confidence.mean() > 0.85 and (classes > 0).sum() >= 8


def digits_classifier():
    """Logistic regression on a stratified 70% training split of scikit-learn's digits (0..16 pixel scale)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    return LogisticRegression(max_iter=5000).fit(x_train, y_train), x_test, y_test


@pytest.mark.slow
def test_digits_model_samples_are_recognised_as_digits():
    from ddpm_plugin.sampling import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than two threads on a shared two-core machine
    try:
        pipe = load_pipeline(DIGITS_MODEL)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=64, num_inference_steps=1000, generator=torch.manual_seed(0), output_type="np").images
    finally:
        torch.set_num_threads(threads)
    samples = images[..., 0].reshape(64, 64) * 16.0  # [0, 1] -> load_digits' 0..16

    classifier, x_test, y_test = digits_classifier()
    real_confidence = classifier.predict_proba(x_test).max(axis=1)
    sample_confidence = classifier.predict_proba(samples).max(axis=1)
    classes = np.bincount(classifier.predict(samples), minlength=10)
    print(f"\nmean confidence {sample_confidence.mean():.3f} (real {real_confidence.mean():.3f}); confident "
          f"{(sample_confidence > CONFIDENT).mean():.2f} (real {(real_confidence > CONFIDENT).mean():.2f}); classes {classes.tolist()}")
    assert classifier.score(x_test, y_test) > 0.9
    assert sample_confidence.mean() > 0.9 * real_confidence.mean()  # the measured figures: docs/quality.md
    assert (sample_confidence > CONFIDENT).mean() > 0.75
    assert (classes > 0).sum() >= 9, f"samples cover too few digits: {classes.tolist()}"
