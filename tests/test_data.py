"""Training data: every source gives uint8 [C, H, W] images, mapped to [-1, 1]; bad data fails early, naming the file."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_plugin.data import DIGITS_TEST_FRACTION, MNIST_DIR_ENV, DataError, digits_split, load_image_dataset
from ddpm_plugin.pipelines.diffusion_ops import to_model_range

MNIST_DIR = os.environ.get(MNIST_DIR_ENV)
needs_mnist = pytest.mark.skipif(not MNIST_DIR, reason=f"${MNIST_DIR_ENV} is not set (the folder of mnist_train.npz "
                                                       "and mnist_test.npz, or of MNIST's IDX files)")


def write_images(folder: Path, count: int, size: int = 8, mode: str = "L") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
        paths.append(path)
    return paths


def test_digits_are_scaled_from_0_16_to_0_255():
    from sklearn.datasets import load_digits

    dataset = load_image_dataset("digits", image_size=8, channels=1)
    raw = load_digits().images[digits_split("train")]
    assert len(dataset) == len(raw)
    assert dataset[0].shape == (1, 8, 8) and dataset[0].dtype == torch.uint8
    np.testing.assert_array_equal(dataset[5][0].numpy(), np.round(raw[5] * 255 / 16).astype(np.uint8))
    assert int(dataset.images.max()) == 255 and int(dataset.images.min()) == 0


def test_digits_hold_out_a_fixed_test_split_the_training_set_never_sees():
    train, test = digits_split("train"), digits_split("test")
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * DIGITS_TEST_FRACTION)
    assert not set(train.tolist()) & set(test.tolist())
    np.testing.assert_array_equal(test, digits_split("test"))  # fixed, not drawn anew
    held_out = load_image_dataset("digits", image_size=8, channels=1, split="test")
    assert len(held_out) == len(test)
    training = {bytes(image.numpy()) for image in load_image_dataset("digits", image_size=8, channels=1)}
    assert sum(bytes(image.numpy()) in training for image in held_out) < len(test) // 10  # only duplicate digits
    from sklearn.datasets import load_digits

    assert set(np.bincount(load_digits().target[test])) != {0} and (np.bincount(load_digits().target[test]) > 20).all()


def test_model_range_is_x_over_127_5_minus_1():
    pixels = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    torch.testing.assert_close(to_model_range(pixels), pixels.double().div(127.5).sub(1).float(), rtol=0, atol=1e-7)
    assert to_model_range(pixels).min() == -1 and to_model_range(pixels).max() == 1


def test_npz_28x28_is_zero_padded_to_32(tmp_path):
    images = np.random.default_rng(0).integers(1, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "small.npz", images=images, labels=np.arange(5))
    dataset = load_image_dataset(str(tmp_path / "small.npz"), image_size=32, channels=1)
    item = dataset[3]
    assert item.shape == (1, 32, 32)
    np.testing.assert_array_equal(item[0, 2:30, 2:30].numpy(), images[3])
    assert int(item[0, :2].sum()) == int(item[0, -2:].sum()) == int(item[0, :, :2].sum()) == 0


@needs_mnist
def test_mnist_dataset_reads_the_npz_of_the_mnist_folder_padded_to_32():
    dataset = load_image_dataset("mnist", image_size=32, channels=1)
    assert len(dataset) == 60000 and dataset[0].shape == (1, 32, 32)
    assert len(load_image_dataset("mnist", image_size=28, channels=1, split="test")) == 10000


def write_idx(path: Path, images: np.ndarray) -> Path:
    """MNIST's IDX format: magic 0x00000803 (unsigned bytes, 3 dimensions), the dimensions, then the pixels."""
    content = (0x803).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in images.shape) + images.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_reads_the_idx_files_in_the_mnist_folder(tmp_path, monkeypatch, suffix):
    train = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    test = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test)
    monkeypatch.setenv(MNIST_DIR_ENV, str(tmp_path))
    dataset = load_image_dataset("mnist", image_size=32, channels=1)
    assert len(dataset) == 7
    np.testing.assert_array_equal(dataset[4][0, 2:30, 2:30].numpy(), train[4])
    np.testing.assert_array_equal(load_image_dataset("mnist", image_size=28, channels=1, split="test")[2][0].numpy(), test[2])


def test_mnist_finds_the_idx_files_torchvision_leaves_in_the_working_folder(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", images)
    monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(load_image_dataset("mnist", image_size=28, channels=1)[3][0].numpy(), images[3])


@pytest.mark.parametrize("content, message", [
    ((0x801).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(5), "magic"),
    ((0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28)) + bytes(100), "3920 bytes"),
    ((0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (4_000_000_000, 28_000, 28_000)), "GiB"),
])
def test_a_damaged_idx_file_is_named(tmp_path, monkeypatch, content, message):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(content)
    monkeypatch.setenv(MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=message) as error:
        load_image_dataset("mnist", image_size=28, channels=1)
    assert "train-images-idx3-ubyte" in str(error.value)


def test_without_mnist_anywhere_one_message_names_every_way(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # as in an install without the [datasets] extra
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError) as error:
        load_image_dataset("mnist", image_size=28, channels=1)
    message = str(error.value)
    assert MNIST_DIR_ENV in message and "train-images-idx3-ubyte" in message and "ylecun/mnist" in message
    assert "[datasets]" in message and "shared" not in message


def test_npz_without_images_array_names_the_file(tmp_path):
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"wrong\.npz.*no `images` array"):
        load_image_dataset(str(tmp_path / "wrong.npz"), image_size=8, channels=1)


@pytest.mark.slow
def test_a_compressed_npz_bomb_of_the_wrong_size_is_refused_before_decompressing(tmp_path):
    from npz_bombs import run_capped, write_npz_bomb

    bomb = write_npz_bomb(tmp_path / "big.npz", {"images": ((10_000, 256, 256), "|u1")})  # 655 MB declared
    assert bomb.stat().st_size < 4 << 20
    outcome = run_capped(f"from ddpm_plugin.data import load_image_dataset\n"
                         f"result = len(load_image_dataset({str(bomb)!r}, image_size=8, channels=1))",
                         address_space=1_100_000_000)
    print("peak RSS (MB):", outcome["peak_rss_mb"])
    assert "images are 256x256, the preset needs 8x8" in outcome.get("error", ""), outcome
    assert outcome["peak_rss_mb"] < 600


def test_truncated_npz_names_the_file(tmp_path):
    np.savez(tmp_path / "cut.npz", images=np.zeros((50, 8, 8), np.uint8))
    data = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz"):
        load_image_dataset(str(tmp_path / "cut.npz"), image_size=8, channels=1)


def test_image_folder_is_read_recursively(tmp_path):
    paths = write_images(tmp_path / "a", 3) + write_images(tmp_path / "a" / "sub", 2)
    dataset = load_image_dataset(str(tmp_path / "a"), image_size=8, channels=1)
    assert len(dataset) == 5
    expected = np.asarray(Image.open(sorted(paths)[0]))
    np.testing.assert_array_equal(dataset[0][0].numpy(), expected)


def test_empty_folder_fails_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no image files"):
        load_image_dataset(str(tmp_path / "empty"), image_size=8, channels=1)


def test_unreadable_image_fails_naming_the_file(tmp_path):
    write_images(tmp_path / "f", 3)
    (tmp_path / "f" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match=r"broken\.png: unreadable image"):
        load_image_dataset(str(tmp_path / "f"), image_size=8, channels=1)


def test_wrong_channel_count_fails_naming_the_file(tmp_path):
    write_images(tmp_path / "f", 2)
    write_images(tmp_path / "f" / "rgb", 1, mode="RGB")
    with pytest.raises(ValueError, match=r"rgb/img0\.png: image has 3 channel"):
        load_image_dataset(str(tmp_path / "f"), image_size=8, channels=1)


def test_mixed_sizes_fail_naming_the_file(tmp_path):
    write_images(tmp_path / "f", 2)
    Image.new("L", (9, 9)).save(tmp_path / "f" / "odd.png")
    with pytest.raises(ValueError, match=r"odd\.png: image is 9x9"):
        load_image_dataset(str(tmp_path / "f"), image_size=8, channels=1)


def test_wrong_size_for_the_preset_fails(tmp_path):
    write_images(tmp_path / "f", 2, size=8)
    with pytest.raises(ValueError, match=r"img0\.png: images are 8x8, the preset needs 31x31"):
        load_image_dataset(str(tmp_path / "f"), image_size=31, channels=1)
    with pytest.raises(ValueError, match=r"images are 8x8, the preset needs 4x4"):
        load_image_dataset(str(tmp_path / "f"), image_size=4, channels=1)


def test_hf_dataset_on_disk_finds_the_image_column(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(4)]
    table = datasets.Dataset.from_dict({"label": [0, 1, 2, 3], "picture_of_thing": images})
    table = table.cast_column("picture_of_thing", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"), image_size=8, channels=3)
    assert len(dataset) == 4 and dataset.column == "picture_of_thing"
    assert dataset[2].shape == (3, 8, 8) and int(dataset[2].float().mean()) == 20


def test_hf_dataset_with_a_grayscale_row_in_rgb_data_names_the_row(tmp_path):
    import datasets

    images = [Image.new("RGB", (8, 8)), Image.new("L", (8, 8))]
    table = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved row 1: image has 1 channel"):
        load_image_dataset(str(tmp_path / "saved"), image_size=8, channels=3)


def write_png_with_corrupt_pixel_data(path: Path) -> None:
    """A PNG whose every chunk checksum is valid but whose compressed pixel stream (IDAT) is not zlib data."""
    import zlib

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4:start], "big")
    payload = data[start + 4:start + 4 + length][:2] + b"\xff" * (length - 2)  # keep the zlib header, break the stream
    data[start + 4:start + 4 + length] = payload
    data[start + 4 + length:start + 8 + length] = zlib.crc32(b"IDAT" + payload).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_png_with_valid_checksums_but_corrupt_pixels_fails_up_front_naming_it(tmp_path):
    write_images(tmp_path / "f", 3)
    write_png_with_corrupt_pixel_data(tmp_path / "f" / "zlib.png")
    with Image.open(tmp_path / "f" / "zlib.png") as image:
        image.verify()  # a header and checksum check passes it
    with pytest.raises(ValueError, match=r"zlib\.png: unreadable image \(.*\)\.$"):
        load_image_dataset(str(tmp_path / "f"), image_size=8, channels=1)


def test_files_that_are_not_images_are_reported(tmp_path):
    write_images(tmp_path / "f", 2)
    for name in ("notes.txt", "labels.csv", ".DS_Store"):
        (tmp_path / "f" / name).write_text("x")
    with pytest.warns(UserWarning) as caught:
        dataset = load_image_dataset(str(tmp_path / "f"), image_size=8, channels=1)
    assert len(dataset) == 2
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'f'}: skipped 3 file(s) that are not images: .DS_Store, labels.csv, notes.txt."]


def test_a_folder_of_images_only_warns_about_nothing(tmp_path, recwarn):
    write_images(tmp_path / "f", 2)
    load_image_dataset(str(tmp_path / "f"), image_size=8, channels=1)
    assert not recwarn.list
