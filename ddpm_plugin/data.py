"""Training images: scikit-learn's digits, MNIST, a folder of images, an `.npz` with an `images` array, or a Hugging
Face `datasets` name or local path.

The two named data sets have a training and a test split: MNIST its own, digits a fixed held-out fifth
(`digits_split`) that training never sees and bits/dim is measured on. MNIST is read from `$DDPM_MNIST_DIR` (the
`.npz` files `mnist_train.npz`/`mnist_test.npz`, or MNIST's IDX files), else from the IDX files torchvision and
others leave on disk, else from Hugging Face `datasets` (`ylecun/mnist`, the `[datasets]` extra).

Every source yields uint8 tensors `[C, H, W]`; `pipelines.diffusion_ops.to_model_range` maps them to [-1, 1] as
x / 127.5 - 1 (the official code's scaling). Every image is decoded once before training starts, and a bad item
is reported with the file (or dataset row) it came from, so a run never dies hours in on one broken image;
should a file change under a running job, the error it raises (`DataError`) still names it.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .trust import UntrustedInputError, check_allocation, load_npz, regular_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture")
# PIL modes we accept, and the channel count each gives ("P" palettes are expanded to RGB).
MODE_CHANNELS = {"1": 1, "L": 1, "P": 3, "RGB": 3}
SKIPPED_SHOWN = 5  # skipped file names listed in the warning

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
DIGITS_TEST_FRACTION = 0.2  # the held-out part of scikit-learn's digits
DIGITS_SPLIT_SEED = 0  # legacy `RandomState`, whose stream NumPy keeps fixed across releases
MNIST_DIR_ENV = "DDPM_MNIST_DIR"
MNIST_HF_NAME = "ylecun/mnist"
MNIST_NPZ = {"train": "mnist_train.npz", "test": "mnist_test.npz"}
MNIST_IDX = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
# Where torchvision (`MNIST(root)`, `root` usually ./data) and others leave MNIST's IDX files.
MNIST_IDX_FOLDERS = ("data/MNIST/raw", "~/data/MNIST/raw", "~/.torch/datasets/MNIST/raw", "~/.cache/torchvision/MNIST/raw",
                     "~/.pytorch/MNIST/raw")
IDX_UBYTE_3D = 0x00000803  # IDX magic: unsigned bytes, 3 dimensions


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


def load_image_dataset(dataset: str, image_size: int, channels: int, split: Split = "train") -> ImageDataset:
    """The images named by `dataset`, checked against the preset's `image_size` and `channels`.

    Args:
        dataset (`str`):
            `"digits"` (scikit-learn's bundled 8x8 digits, 0..16 scaled to 0..255), `"mnist"` (see the module
            docstring for where it is found), a folder of images, an `.npz` file with a uint8 `images` array
            (`[N, H, W]` or `[N, H, W, C]`), or a Hugging Face `datasets` name or local dataset path (the image
            column is found automatically).
        image_size (`int`):
            Side of the square images the model takes. Images smaller by an even margin (MNIST's 28 for 32)
            are zero-padded around; other sizes are an error.
        channels (`int`):
            1 (grayscale) or 3 (RGB).
        split (`str`, *optional*, defaults to `"train"`):
            `"train"` or `"test"` of digits and MNIST (digits: the fixed held-out fifth); other sources are
            used whole.

    Raises:
        `DataError` (a `ValueError`) or `FileNotFoundError` naming the offending file or row: an empty folder,
        an unreadable file, a wrong channel count, mixed or wrong sizes. Files in a folder that are not images
        are skipped with a warning naming them.
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
    if dataset == "digits":
        from sklearn.datasets import load_digits

        images = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255
        return _array_dataset(images[digits_split(split)], f"sklearn digits ({split})", image_size, channels)
    if dataset == "mnist":
        return _mnist_dataset(split, image_size, channels)
    path = Path(dataset)
    if path.suffix == ".npz":
        return _npz_dataset(path, image_size, channels)
    if path.is_dir() and not _is_saved_hf_dataset(path) and not _has_table_files(path):
        return _folder_dataset(path, image_size, channels)
    return _hf_dataset(dataset, image_size, channels)


def digits_split(split: Split) -> np.ndarray:
    """The sorted indices of scikit-learn's digits in `split`: a fixed random fifth is held out as `"test"`."""
    from sklearn.datasets import load_digits

    num_images = len(load_digits().images)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(num_images)
    num_test = round(num_images * DIGITS_TEST_FRACTION)
    return np.sort(order[:num_test] if split == "test" else order[num_test:])


def _mnist_dataset(split: Split, image_size: int, channels: int) -> TensorImageDataset:
    """MNIST's `split` from the first place that has it (see the module docstring); one message naming every
    way when none does."""
    folder = os.environ.get(MNIST_DIR_ENV)
    if folder:
        npz = Path(folder) / MNIST_NPZ[split]
        if npz.is_file():
            return _npz_dataset(npz, image_size, channels)
        idx = _idx_file(Path(folder), split)
        if idx is None:
            raise DataError(f"${MNIST_DIR_ENV}={folder} holds neither {MNIST_NPZ[split]} nor {MNIST_IDX[split]}(.gz).")
        return _array_dataset(read_idx_images(idx), str(idx), image_size, channels)
    for candidate in MNIST_IDX_FOLDERS:
        idx = _idx_file(Path(candidate).expanduser(), split)
        if idx is not None:
            return _array_dataset(read_idx_images(idx), str(idx), image_size, channels)
    try:
        import datasets
    except ImportError:
        hub = f"`pip install ddpm-plugin[datasets]` to read {MNIST_HF_NAME} from the Hugging Face Hub"
    else:
        try:
            loaded = datasets.load_dataset(MNIST_HF_NAME, split=split)
        except Exception as error:
            hub = f"{MNIST_HF_NAME} from the Hugging Face Hub failed ({str(error).strip().splitlines()[0]})"
        else:
            images = np.stack([np.asarray(row["image"], dtype=np.uint8) for row in loaded])
            return _array_dataset(images, f"{MNIST_HF_NAME} ({split})", image_size, channels)
    raise DataError(
        f"MNIST ({split}) was not found. Set ${MNIST_DIR_ENV} to a folder holding {MNIST_NPZ[split]} or "
        f"{MNIST_IDX[split]}(.gz); or leave the IDX files where torchvision puts them "
        f"({', '.join(MNIST_IDX_FOLDERS)}); or {hub}."
    )


def _idx_file(folder: Path, split: Split) -> Path | None:
    for name in (MNIST_IDX[split], MNIST_IDX[split] + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_images(path: Path) -> np.ndarray:
    """uint8 images `[N, H, W]` from an IDX file (MNIST's format, gzipped or not): the header's magic and sizes
    are checked before the pixels are read, and the file must hold exactly that many."""
    path = regular_file(path.parent, path.name, what="the IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            header = file.read(16)
            if len(header) < 16 or int.from_bytes(header[:4], "big") != IDX_UBYTE_3D:
                raise DataError(f"{path}: not an IDX file of images (the magic number must be 0x{IDX_UBYTE_3D:08x}).")
            shape = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
            size = int(np.prod(shape, dtype=np.int64))
            check_allocation(size, f"{path} ({shape[0]} images of {shape[1]}x{shape[2]})")
            pixels = file.read(size + 1)
    except (OSError, EOFError, UntrustedInputError) as error:
        if isinstance(error, UntrustedInputError):
            raise DataError(str(error)) from None
        raise DataError(f"{path}: unreadable IDX file ({error}).") from None
    if len(pixels) != size:
        raise DataError(f"{path}: the header declares {shape[0]} images of {shape[1]}x{shape[2]} ({size} bytes), "
                        f"the file holds {'more' if len(pixels) > size else len(pixels)} bytes.")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(shape)


def dataset_images(dataset: str, image_shape: tuple[int, int, int], num_images: int | None, seed: int,
                   split: Split = "train") -> tuple[np.ndarray, int]:
    """`num_images` uint8 NHWC images of `dataset`'s `split` drawn without replacement with `seed` (all, in order,
    when None), zero-padded to the model's (channels, height, width) as in training, and the size of the split."""
    channels, height, _ = image_shape
    images = load_image_dataset(dataset, height, channels, split)
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


def _check_array(shape: tuple[int, ...], dtype: np.dtype, source: str, image_size: int, channels: int) -> int:
    """The padding of images of `shape` and `dtype` for the preset, or a `DataError` naming what does not fit."""
    if dtype != np.uint8:
        raise DataError(f"{source}: `images` must be uint8 pixels 0..255, got {dtype}.")
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4 or shape[0] == 0:
        raise DataError(f"{source}: `images` must be a non-empty [N, H, W] or [N, H, W, C] array, got {shape}.")
    if shape[-1] != channels:
        raise DataError(f"{source}: images have {shape[-1]} channels, the preset needs {channels}.")
    return _padding(shape[1], shape[2], image_size, source)


def _array_dataset(images: np.ndarray, source: str, image_size: int, channels: int) -> TensorImageDataset:
    pad = _check_array(images.shape, images.dtype, source, image_size, channels)
    if images.ndim == 3:
        images = images[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    tensor = torch.nn.functional.pad(tensor, (pad,) * 4).contiguous()
    return TensorImageDataset(tensor, source)


def _npz_dataset(path: Path, image_size: int, channels: int) -> TensorImageDataset:
    """The `images` of an `.npz` file, whose `.npy` headers are checked against the preset before anything is
    decompressed."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such .npz file.")

    def check(headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        if "images" not in headers:
            raise DataError(f"{path}: no `images` array (it has {sorted(headers)}).")
        _check_array(*headers["images"], str(path), image_size, channels)

    try:
        images = load_npz(regular_file(path.parent, path.name, what="the .npz file"), check)["images"]
    except UntrustedInputError as error:
        raise DataError(str(error)) from None
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
