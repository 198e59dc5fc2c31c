"""Training images: scikit-learn's digits, a folder of images, an `.npz` with an `images` array, or a Hugging Face
`datasets` name or local path.

Every source yields uint8 tensors `[C, H, W]`; `pipelines.diffusion_ops.to_model_range` maps them to [-1, 1] as
x / 127.5 - 1 (the official code's scaling). Every image is decoded once before training starts, and a bad item
is reported with the file (or dataset row) it came from, so a run never dies hours in on one broken image;
should a file change under a running job, the error it raises (`DataError`) still names it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture")
# PIL modes we accept, and the channel count each gives ("P" palettes are expanded to RGB).
MODE_CHANNELS = {"1": 1, "L": 1, "P": 3, "RGB": 3}
SKIPPED_SHOWN = 5  # skipped file names listed in the warning


class DataError(ValueError):
    """An image or data set that cannot be used; the message names the file or row."""


class ImageDataset(Protocol):
    """What the training loop needs: a length and uint8 `[C, H, W]` tensors by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...


class TensorImageDataset:
    """Images held in memory as one uint8 tensor `[N, C, H, W]`."""

    def __init__(self, images: torch.Tensor, source: str):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{source}: expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}.")
        self.images, self.source = images, source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """A whole batch in one indexing operation (`DataLoader` calls this instead of `__getitem__` per item)."""
        return self.images[indices]


class ImageFolderDataset:
    """Image files under a folder (recursively), decoded on access; each was decoded once up front."""

    def __init__(self, files: list[Path], channels: int, pad: int):
        self.files, self.channels, self.pad = files, channels, pad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        file = self.files[index]
        try:
            return _pil_to_tensor(_decode(file), self.channels, self.pad)
        except Exception as error:
            raise DataError(f"{file}: unreadable image ({error}).") from error


class HFImageDataset:
    """One image column of a Hugging Face `datasets.Dataset`, decoded on access."""

    def __init__(self, dataset: Any, column: str, channels: int, pad: int, source: str):
        self.dataset, self.column, self.channels, self.pad, self.source = dataset, column, channels, pad, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return _pil_to_tensor(self.dataset[int(index)][self.column], self.channels, self.pad)
        except Exception as error:
            raise DataError(f"{self.source} row {index}: unreadable image ({error}).") from error


def load_image_dataset(dataset: str, image_size: int, channels: int) -> ImageDataset:
    """The training images named by `dataset`, checked against the preset's `image_size` and `channels`.

    Args:
        dataset (`str`):
            `"digits"` (scikit-learn's bundled 8x8 digits, 0..16 scaled to 0..255), `"mnist"` (the `.npz` files
            in `$DDPM_MNIST_DIR`, default `../shared/data/mnist`), a folder of images, an `.npz` file with a
            uint8 `images` array (`[N, H, W]` or `[N, H, W, C]`), or a Hugging Face `datasets` name or local
            dataset path (the image column is found automatically).
        image_size (`int`):
            Side of the square images the model takes. Images smaller by an even margin (MNIST's 28 for 32)
            are zero-padded around; other sizes are an error.
        channels (`int`):
            1 (grayscale) or 3 (RGB).

    Raises:
        `DataError` (a `ValueError`) or `FileNotFoundError` naming the offending file or row: an empty folder,
        an unreadable file, a wrong channel count, mixed or wrong sizes. Files in a folder that are not images
        are skipped with a warning naming them.
    """
    if dataset == "digits":
        from sklearn.datasets import load_digits

        images = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255
        return _array_dataset(images, "sklearn digits", image_size, channels)
    if dataset == "mnist":
        folder = Path(os.environ.get("DDPM_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
        return load_image_dataset(str(folder / "mnist_train.npz"), image_size, channels)
    path = Path(dataset)
    if path.suffix == ".npz":
        return _npz_dataset(path, image_size, channels)
    if path.is_dir() and not _is_saved_hf_dataset(path) and not _has_table_files(path):
        return _folder_dataset(path, image_size, channels)
    return _hf_dataset(dataset, image_size, channels)


def dataset_images(dataset: str, image_shape: tuple[int, int, int], num_images: int | None, seed: int) -> tuple[np.ndarray, int]:
    """`num_images` uint8 NHWC images of `dataset` drawn without replacement with `seed` (all, in order, when None),
    zero-padded to the model's (channels, height, width) as in training, and the size of the whole data set."""
    channels, height, _ = image_shape
    images = load_image_dataset(dataset, height, channels)
    if num_images is None or num_images >= len(images):
        indices = torch.arange(len(images))
    else:
        indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_images].sort().values
    return torch.stack([images[int(i)] for i in indices]).permute(0, 2, 3, 1).numpy(), len(images)


def _padding(height: int, width: int, image_size: int, source: str) -> int:
    """The zero padding on each side that brings `height` x `width` to `image_size`, or a `DataError`."""
    margin = image_size - height
    if height != width or margin < 0 or margin % 2:
        raise DataError(f"{source}: images are {height}x{width}, the preset needs {image_size}x{image_size}.")
    return margin // 2


def _array_dataset(images: np.ndarray, source: str, image_size: int, channels: int) -> TensorImageDataset:
    if images.dtype != np.uint8:
        raise DataError(f"{source}: `images` must be uint8 pixels 0..255, got {images.dtype}.")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"{source}: `images` must be a non-empty [N, H, W] or [N, H, W, C] array, got {images.shape}.")
    if images.shape[-1] != channels:
        raise DataError(f"{source}: images have {images.shape[-1]} channels, the preset needs {channels}.")
    pad = _padding(images.shape[1], images.shape[2], image_size, source)
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    tensor = torch.nn.functional.pad(tensor, (pad,) * 4).contiguous()
    return TensorImageDataset(tensor, source)


def _npz_dataset(path: Path, image_size: int, channels: int) -> TensorImageDataset:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DataError(f"{path}: no `images` array (it has {archive.files}).")
            images = archive["images"]
    except DataError:
        raise
    except Exception as error:  # zipfile.BadZipFile, EOFError, OSError: a damaged archive
        raise DataError(f"{path}: unreadable .npz file ({error}).") from error
    return _array_dataset(images, str(path), image_size, channels)


def _folder_dataset(folder: Path, image_size: int, channels: int) -> ImageFolderDataset:
    everything = sorted(p for p in folder.rglob("*") if p.is_file())
    files = [p for p in everything if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder.")
    _report_skipped(folder, [p for p in everything if p.suffix.lower() not in IMAGE_SUFFIXES])
    first_size = None
    for file in files:
        try:
            image = _decode(file)
        except Exception as error:
            raise DataError(f"{file}: unreadable image ({error}).") from error
        _check_mode(image.mode, channels, str(file))
        first_size = first_size or (image.size, file)
        if image.size != first_size[0]:
            raise DataError(f"{file}: image is {image.size[0]}x{image.size[1]} but {first_size[1]} is "
                            f"{first_size[0][0]}x{first_size[0][1]}; all images must have one size.")
    width, height = first_size[0]
    return ImageFolderDataset(files, channels, _padding(height, width, image_size, str(first_size[1])))


def _decode(file: Path) -> Any:
    """The PIL image in `file`, every pixel decoded: a header check (`verify()`) passes a PNG whose compressed
    data is corrupt under valid checksums."""
    from PIL import Image

    with open(file, "rb") as stream:
        image = Image.open(stream)
        image.load()
    return image


def _report_skipped(folder: Path, skipped: list[Path]) -> None:
    if skipped:
        names = ", ".join(str(p.relative_to(folder)) for p in skipped[:SKIPPED_SHOWN])
        more = f" and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        warnings.warn(f"{folder}: skipped {len(skipped)} file(s) that are not images: {names}{more}.", stacklevel=3)


def _is_saved_hf_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _has_table_files(path: Path) -> bool:
    """A local copy of a Hub dataset repository (parquet/arrow files) rather than a folder of images."""
    return any(path.rglob("*.parquet")) or any(path.rglob("*.arrow"))


def _hf_dataset(name: str, image_size: int, channels: int) -> HFImageDataset:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"{name!r} is not digits, mnist, a folder or an .npz file; Hugging Face datasets need "
                         "`pip install ddpm-plugin[datasets]`.") from error
    path = Path(name)
    if path.is_dir() and _is_saved_hf_dataset(path):
        loaded = datasets.load_from_disk(str(path))
    elif path.exists() and not path.is_dir():
        raise DataError(f"{path}: not a folder, an .npz file or a saved dataset.")
    else:
        try:
            loaded = datasets.load_dataset(name, split="train")
        except Exception as error:
            raise DataError(f"{name!r}: not a local folder/.npz and `datasets.load_dataset` failed: {error}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{name}: the dataset has no 'train' split (splits: {list(loaded)}).")
        loaded = loaded["train"]
    column = find_image_column(loaded.features, name)
    if len(loaded) == 0:
        raise DataError(f"{name}: the dataset is empty.")
    first_size = None
    for row in range(len(loaded)):  # `datasets` opens Image features lazily with PIL: decode each once
        try:
            image = loaded[row][column]
            image.load()
        except Exception as error:
            raise DataError(f"{name} row {row}: unreadable image ({error}).") from error
        _check_mode(image.mode, channels, f"{name} row {row}")
        first_size = first_size or image.size
        if image.size != first_size:
            raise DataError(f"{name} row {row}: image is {image.size}, row 0 is {first_size}; all images must have one size.")
    pad = _padding(first_size[1], first_size[0], image_size, name)
    return HFImageDataset(loaded, column, channels, pad, name)


def find_image_column(features: Any, source: str) -> str:
    """The dataset column holding images: the first `datasets.Image` feature, else a conventionally named one."""
    import datasets

    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    for column in IMAGE_COLUMN_NAMES:
        if column in features:
            return column
    raise DataError(f"{source}: no image column (columns: {list(features)}).")


def _check_mode(mode: str, channels: int, source: str) -> None:
    if mode not in MODE_CHANNELS:
        raise DataError(f"{source}: unsupported image mode {mode!r} (supported: {sorted(MODE_CHANNELS)}).")
    if MODE_CHANNELS[mode] != channels:
        raise DataError(f"{source}: image has {MODE_CHANNELS[mode]} channel(s) ({mode}), the preset needs {channels}.")


def _pil_to_tensor(image: Any, channels: int, pad: int) -> torch.Tensor:
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, channels)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return torch.nn.functional.pad(tensor, (pad,) * 4)
