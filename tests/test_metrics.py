"""FID and Inception Score through torchmetrics, with small feature extractors standing in for Inception
(its weights cannot be downloaded here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation_fixtures import InceptionLike, one_thread  # noqa: F401 (one_thread: autouse fixture)
from ddpm_plugin.metrics import (
    INCEPTION_WEIGHTS_ENV,
    FidStatistics,
    ImageMetrics,
    InceptionWeightsError,
    InceptionWeightsNotFoundError,
    TorchScriptInception,
)


class PooledPixels(torch.nn.Module):
    """Features: the mean of each 2x2 quarter of the image, on 0..1."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)


class BrightnessClassifier(torch.nn.Module):
    """Confident logits over 4 classes: the image's mean brightness quartile."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        quartile = (images.float().mean(dim=(1, 2, 3)) / 64).long().clamp(max=3)
        return torch.nn.functional.one_hot(quartile, 4).float() * 50.0


def random_images(seed: int, n: int = 64, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, 8, 8, 1), dtype=np.uint8)


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = random_images(0)
    same = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    same.update_real(real)
    same.update_fake(real)
    assert same.compute()["fid"] == pytest.approx(0.0, abs=1e-6)

    halves = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    halves.update_real(random_images(1, 256))
    halves.update_fake(random_images(2, 256))
    shifted = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    shifted.update_real(random_images(1, 256))
    shifted.update_fake(random_images(2, 256, low=64))  # brighter
    assert halves.compute()["fid"] < 0.01 < shifted.compute()["fid"]


def test_fid_real_statistics_stream_over_batches():
    real, fake = random_images(3, 128), random_images(4, 128, high=200)
    whole = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    whole.update_real(real)
    whole.update_fake(fake)
    batched = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    for start in range(0, 128, 32):
        batched.update_real(real[start : start + 32])
        batched.update_fake(fake[start : start + 32])
    assert batched.compute()["fid"] == pytest.approx(whole.compute()["fid"], rel=1e-6)


def test_inception_score_counts_confidently_recognised_classes():
    levels = np.repeat(np.array([10, 80, 150, 230], dtype=np.uint8), 25)  # 4 classes, 25 images each
    images = np.broadcast_to(levels[:, None, None, None], (100, 8, 8, 1)).copy()
    metrics = ImageMetrics(("inception_score",), feature_extractor=PooledPixels(),
                           logits_extractor=BrightnessClassifier(), splits=1)
    metrics.update_fake(images)
    result = metrics.compute()
    assert result["inception_score"] == pytest.approx(4.0, rel=1e-4)  # exp(H(y)) for confident, balanced classes

    one_class = ImageMetrics(("inception_score",), feature_extractor=BrightnessClassifier(), splits=1)
    one_class.update_fake(np.full((20, 8, 8, 1), 10, dtype=np.uint8))
    assert one_class.compute()["inception_score"] == pytest.approx(1.0, rel=1e-4)


def test_missing_inception_weights_say_how_to_point_at_a_local_file(monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsNotFoundError) as error:
        ImageMetrics()
    message = str(error.value)
    assert "--inception-weights" in message and INCEPTION_WEIGHTS_ENV in message
    assert "inception-2015-12-05.pt" in message and "feature_extractor" in message


def test_a_missing_weights_file_is_named(tmp_path):
    with pytest.raises(InceptionWeightsNotFoundError, match="nowhere.pt does not exist"):
        ImageMetrics(inception_weights=tmp_path / "nowhere.pt")


def test_local_torchscript_inception_file_is_used_for_fid_and_is(tmp_path, monkeypatch):
    path = tmp_path / "inception-like.pt"
    torch.jit.script(InceptionLike()).save(str(path))
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))  # the environment variable is enough
    metrics = ImageMetrics(splits=2)
    metrics.update_real(random_images(5, 32))
    metrics.update_fake(random_images(6, 32))
    result = metrics.compute()
    assert set(result) == {"fid", "inception_score", "inception_score_std"}
    assert result["fid"] >= 0 and 1.0 <= result["inception_score"] <= 12.0
    # The IS network gives log-probabilities, so torchmetrics' softmax returns the network's probabilities.
    gray = torch.from_numpy(random_images(7, 4)).permute(0, 3, 1, 2)
    probabilities = InceptionLike()(gray.repeat(1, 3, 1, 1))
    logits = TorchScriptInception(path, "logits")(gray)
    torch.testing.assert_close(logits.softmax(dim=1), probabilities)


@pytest.mark.parametrize("images, message", [(np.zeros((2, 8, 8, 1), np.float32), "uint8"),
                                             (np.zeros((8, 8), np.uint8), "shape")])
def test_metrics_reject_images_that_are_not_uint8_batches(images, message):
    metrics = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    with pytest.raises(ValueError, match=message):
        metrics.update_fake(images)


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="metrics"):
        ImageMetrics(("fid", "precision"), feature_extractor=PooledPixels())


def test_saved_fid_statistics_give_the_same_fid_as_the_reference_images(tmp_path):
    streamed = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    streamed.update_real(random_images(1, 128))
    streamed.update_fake(random_images(2, 64, low=32))
    expected = streamed.compute()["fid"]
    streamed.real_statistics().save(tmp_path / "reference.npz")

    statistics = FidStatistics.load(tmp_path / "reference.npz")
    features = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(random_images(1, 128)).permute(0, 3, 1, 2).double() / 255.0, 2).flatten(1)
    np.testing.assert_allclose(statistics.mu, features.mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(statistics.sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-4, atol=1e-9)
    assert statistics.num_images == 128 and "PooledPixels" in statistics.network

    reused = ImageMetrics(("fid",), feature_extractor=PooledPixels())
    reused.load_real_statistics(statistics)
    reused.update_fake(random_images(2, 64, low=32))
    assert reused.compute()["fid"] == pytest.approx(expected, rel=1e-9)


def test_fid_statistics_of_another_network_are_refused():
    class OtherFeatures(PooledPixels):
        pass

    statistics = FidStatistics(np.zeros(4), np.eye(4), 10, "TorchScript inception-2015-12-05.pt sha256:0123")
    with pytest.raises(ValueError, match="compute them again with this network"):
        ImageMetrics(("fid",), feature_extractor=OtherFeatures()).load_real_statistics(statistics)


def test_a_file_that_is_not_fid_statistics_is_named(tmp_path):
    np.savez(tmp_path / "images.npz", images=random_images(0, 4))
    with pytest.raises(ValueError, match="images.npz is not an FID statistics file"):
        FidStatistics.load(tmp_path / "images.npz")


def test_a_torchscript_file_that_is_not_one_is_named(tmp_path):
    (tmp_path / "inception.pt").write_bytes(b"<html>404</html>")
    with pytest.raises(InceptionWeightsError, match=r"inception.pt \(16 bytes\) is not a TorchScript network"):
        TorchScriptInception(tmp_path / "inception.pt")


@pytest.mark.slow
def test_a_compressed_fid_statistics_bomb_is_refused_before_decompressing(tmp_path):
    from npz_bombs import run_capped, write_npz_bomb

    bomb = write_npz_bomb(tmp_path / "stats.npz", {"mu": ((9000,), "<f8"), "sigma": ((9000, 9000), "<f8"),
                                                    "num_images": ((), "<i8"), "network": ((), "<U8")})
    assert bomb.stat().st_size < 8 << 20  # 648 MB declared
    outcome = run_capped(f"from ddpm_plugin.metrics import FidStatistics\nresult = FidStatistics.load({str(bomb)!r}).num_images",
                         address_space=1_100_000_000)
    print("peak RSS (MB):", outcome["peak_rss_mb"])
    assert outcome.get("error", "").startswith("UntrustedInputError") and "stats.npz" in outcome["error"], outcome
    assert outcome["peak_rss_mb"] < 600


@pytest.mark.parametrize("arrays, message", [
    ({"mu": ((4,), "<f8"), "sigma": ((5, 5), "<f8"), "num_images": ((), "<i8"), "network": ((), "<U3")}, "do not fit together"),
    ({"mu": ((4,), "<f8"), "sigma": ((4, 4), "<f8"), "num_images": ((), "<i8")}, "network"),
    ({"mu": ((4,), "<f8"), "sigma": ((4, 4), "<f8"), "num_images": ((3,), "<i8"), "network": ((), "<U3")}, "num_images"),
])
def test_fid_statistics_of_the_wrong_shape_are_refused_from_their_headers(tmp_path, arrays, message):
    from npz_bombs import write_npz_bomb

    with pytest.raises(ValueError, match=message):
        FidStatistics.load(write_npz_bomb(tmp_path / "stats.npz", arrays))


def test_fid_statistics_are_written_whole_or_not_at_all(tmp_path):
    statistics = FidStatistics(np.zeros(3), np.eye(3), 5, "net")
    path = tmp_path / "stats.npz"
    statistics.save(path)
    FidStatistics(np.ones(3), np.eye(3), 5, "net").save(path)
    assert FidStatistics.load(path).mu.tolist() == [1, 1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]
