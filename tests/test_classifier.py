"""The digit classifier that measures 28x28 models: the Frechet distance formula, and the shipped weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_plugin.classifier import DigitClassifier, classify, frechet_distance, load_classifier, save_classifier

MNIST_DIR = Path(os.environ.get("DDPM_MNIST_DIR") or "$DDPM_MNIST_DIR (not set)")


def test_frechet_distance_is_zero_for_a_set_and_the_squared_shift_for_its_translate():
    features = np.random.default_rng(0).standard_normal((500, 8)) @ np.diag(np.arange(1, 9.0))
    shift = np.linspace(-1, 1, 8)
    assert abs(frechet_distance(features, features)) < 1e-8
    assert frechet_distance(features, features + shift) == pytest.approx((shift**2).sum(), abs=1e-8)


def test_frechet_distance_of_gaussians_with_diagonal_covariances():
    """For diagonal covariances the trace term is sum (sqrt(a_i) - sqrt(b_i))^2 exactly."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4000, 4)), rng.standard_normal((4000, 4))
    a, b = (a - a.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T, (b - b.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(b, rowvar=False))).T
    scale_a, scale_b = np.array([1.0, 2.0, 3.0, 0.5]), np.array([2.0, 2.0, 1.0, 0.5])
    expected = ((scale_a - scale_b) ** 2).sum()
    assert frechet_distance(a * scale_a, b * scale_b) == pytest.approx(expected, rel=1e-6)


def test_classifier_round_trips_through_safetensors_with_the_permissions_of_its_config(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(feature_dim=16).eval()
    save_classifier(model, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_mode == (tmp_path / "config.json").stat().st_mode
    loaded = load_classifier(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(classify(model, images)[1], classify(loaded, images)[1])
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


@pytest.mark.skipif(not (MNIST_DIR / "mnist_test.npz").is_file(), reason=f"MNIST is not at {MNIST_DIR}")
def test_shipped_classifier_reaches_98_percent_on_mnist_test():
    test = np.load(MNIST_DIR / "mnist_test.npz")
    _, probabilities = classify(load_classifier(), test["images"])
    assert (probabilities.argmax(1) == test["labels"]).mean() >= 0.98
