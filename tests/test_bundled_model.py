"""The bundled digits pipeline: small, stock-loadable, the default of `ddpm sample`, and it draws digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpm_plugin.bundled import BUNDLED_MODEL

NUM_SAMPLES = 64
CONFIDENT = 0.9  # a sample counts as a recognisable digit when the classifier gives one class this probability


def test_bundled_model_is_small_safetensors_with_stock_classes():
    files = [p for p in BUNDLED_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8_000_000  # the PyTorch weights (2.8 MB) and the ONNX export
    assert (BUNDLED_MODEL / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 3_000_000
    weights = [p.name for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pkl")]
    assert weights == ["diffusion_pytorch_model.safetensors"]  # EMA weights only
    index = json.loads((BUNDLED_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]


def test_ddpm_sample_defaults_to_the_bundled_model(tmp_path, capsys):
    from PIL import Image

    from ddpm_plugin.cli import main

    assert main(["sample", "--num-images", "2", "--steps", "2", "--output", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 8


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
def test_bundled_model_samples_are_recognised_as_digits():
    from ddpm_plugin.sampling import load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than two threads on a shared two-core machine
    try:
        pipe = load_pipeline(BUNDLED_MODEL)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=NUM_SAMPLES, num_inference_steps=1000, generator=torch.manual_seed(0), output_type="np").images
    finally:
        torch.set_num_threads(threads)
    samples = images[..., 0].reshape(NUM_SAMPLES, 64) * 16.0  # [0, 1] -> load_digits' 0..16

    classifier, x_test, y_test = digits_classifier()
    real_confidence = classifier.predict_proba(x_test).max(axis=1)
    sample_confidence = classifier.predict_proba(samples).max(axis=1)
    classes = np.bincount(classifier.predict(samples), minlength=10)
    print(
        f"\nclassifier accuracy on real test digits: {classifier.score(x_test, y_test):.3f}"
        f"\nmean max-probability: samples {sample_confidence.mean():.3f}, real test digits {real_confidence.mean():.3f}"
        f"\nconfidence > {CONFIDENT}: samples {(sample_confidence > CONFIDENT).mean():.2f}, "
        f"real test digits {(real_confidence > CONFIDENT).mean():.2f}\nsamples per class: {classes.tolist()}"
    )
    assert classifier.score(x_test, y_test) > 0.9
    assert sample_confidence.mean() > 0.9 * real_confidence.mean()  # measured: 0.967 vs 0.982
    assert (sample_confidence > CONFIDENT).mean() > 0.75  # measured: 0.91 (real test digits: 0.94)
    assert (classes > 0).sum() >= 9, f"samples cover too few digits: {classes.tolist()}"
