"""A small digit classifier that measures 28x28 digit models the way FID measures the paper's.

FID's Inception network sees nothing useful in 28x28 grey digits, so sample quality of the MNIST model is measured
with this classifier instead: the Frechet distance between its penultimate-layer features of samples and of test
images (`frechet_distance`), its class histogram and its confidence. `train_digit_classifier` trains it on MNIST's
training split on one CPU thread (its test accuracy: docs/quality.md); the trained weights ship in
`ddpm_plugin/bundled/mnist-classifier/` (safetensors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import match_json_permissions

CLASSIFIER_DIR = Path(__file__).parent / "bundled" / "mnist-classifier"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class DigitClassifier(torch.nn.Module):
    """Two 3x3 conv + max-pool stages and a `feature_dim` hidden layer (the features) before the 10 logits.

    Takes uint8 images `[N, 1, 28, 28]` (0..255), as `ddpm_plugin.metrics.ImageMetrics` passes them.
    """

    def __init__(self, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = {"feature_dim": feature_dim, "num_classes": num_classes}
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = torch.nn.Linear(64 * 7 * 7, feature_dim)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features `[N, feature_dim]` of uint8 images."""
        if images.shape[1:] != (1, 28, 28):
            raise ValueError(f"the digit classifier takes [N, 1, 28, 28] images, got {tuple(images.shape)}.")
        x = images.float() / 255.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits `[N, num_classes]`."""
        return self.head(self.features(images))


class ClassifierFeatures(torch.nn.Module):
    """The classifier's penultimate features as a module, for `ImageMetrics(feature_extractor=...)`."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def train_digit_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 2, batch_size: int = 128,
                           learning_rate: float = 1e-3, seed: int = 0) -> DigitClassifier:
    """Adam on cross-entropy over uint8 images `[N, 28, 28]` with integer labels."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    x, y = torch.from_numpy(images)[:, None], torch.from_numpy(labels).long()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def save_classifier(model: DigitClassifier, folder: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(model.config, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    match_json_permissions(folder)


def load_classifier(folder: str | os.PathLike = CLASSIFIER_DIR) -> DigitClassifier:
    """The trained classifier (by default the shipped one), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no digit classifier in {folder} ({WEIGHTS_FILE} is missing).")
    model = DigitClassifier(**json.loads((folder / CONFIG_FILE).read_text()))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Features `[N, D]` and class probabilities `[N, 10]` of uint8 images `[N, 28, 28]` or `[N, 28, 28, 1]`."""
    x = torch.from_numpy(np.ascontiguousarray(images.reshape(len(images), 1, 28, 28)))
    features, probabilities = [], []
    for batch in x.split(batch_size):
        f = model.features(batch)
        features.append(f.double().numpy())
        probabilities.append(torch.softmax(model.head(f), dim=1).double().numpy())
    return np.concatenate(features), np.concatenate(probabilities)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2): the Frechet distance of the two feature sets'
    Gaussian fits (FID's formula), computed in float64 through symmetric eigendecompositions."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)
