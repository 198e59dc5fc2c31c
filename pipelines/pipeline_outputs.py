"""The outputs of `DDPMPaperPipeline`'s methods, beside `pipeline_ddpm_paper.py` (it travels with it into every
saved folder). NumPy, diffusers' `BaseOutput` and the sibling `variational_bound.py` only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from diffusers.utils import BaseOutput

from .variational_bound import BoundTerms, cumulative_rate_bpd, distortion_rmse


@dataclass
class ProgressiveGenerationOutput(BaseOutput):
    """Output of [`DDPMPaperPipeline.progressive_generation`] (paper Fig. 6).

    Args:
        images (`np.ndarray` of shape `(batch_size, height, width, channels)`):
            The final samples x_0 in [0, 1].
        x_t (`np.ndarray` of shape `(num_snapshots, batch_size, height, width, channels)`):
            The noisy samples x_t at each snapshot, mapped from [-1, 1] to [0, 1] and clipped.
        pred_original_sample (`np.ndarray` of the same shape as `x_t`):
            The model's prediction of x_0 from x_t at each snapshot, in [0, 1].
        timesteps (`list[int]`):
            The timestep t of each snapshot.
    """

    images: np.ndarray
    x_t: np.ndarray
    pred_original_sample: np.ndarray
    timesteps: list[int]


@dataclass
class BitsPerDimOutput(BaseOutput):
    """Output of [`DDPMPaperPipeline.bits_per_dim`]: the variational bound (paper Eq. 5) and its breakdown.

    Args:
        total_bpd (`np.ndarray` of shape `(num_images,)`):
            The bound -log p(x_0) <= L in bits/dim: `terms_bpd.sum(1) + prior_bpd`.
        terms_bpd (`np.ndarray` of shape `(num_images, num_train_timesteps)`):
            Column t > 0 is the KL term at t, column 0 the decoder term L_0, in bits/dim.
        prior_bpd (`np.ndarray` of shape `(num_images,)`):
            L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim.
        decoder_bpd (`np.ndarray` of shape `(num_images,)`):
            L_0 = -log p(x_0 | x_1) in bits/dim (`terms_bpd[:, 0]`): the distortion of Table 4.
        rate_bpd (`np.ndarray` of shape `(num_images,)`):
            L_T + L_{T-1} + ... + L_1 in bits/dim: the rate of Table 4 (`total_bpd = rate_bpd + decoder_bpd`).
        x_start_mse (`np.ndarray` of shape `(num_images, num_train_timesteps)`):
            Mean squared error of the clipped x_0 prediction from x_t, on the [-1, 1] scale.
        cumulative_rate_bpd (`np.ndarray` of shape `(num_train_timesteps,)`):
            Mean over images of the rate received from T down to t (paper Fig. 5, middle).
        distortion_rmse (`np.ndarray` of shape `(num_train_timesteps,)`):
            RMSE of the x_0 prediction from x_t on the 0..255 scale, over all images (paper Fig. 5, left).
    """

    total_bpd: np.ndarray
    terms_bpd: np.ndarray
    prior_bpd: np.ndarray
    decoder_bpd: np.ndarray
    rate_bpd: np.ndarray
    x_start_mse: np.ndarray
    cumulative_rate_bpd: np.ndarray
    distortion_rmse: np.ndarray

    @classmethod
    def from_terms(cls, terms: BoundTerms) -> "BitsPerDimOutput":
        """The totals and curves of the per-image terms [`calc_bpd_loop`] returns."""
        return cls(
            total_bpd=terms.terms_bpd.sum(axis=1) + terms.prior_bpd,
            terms_bpd=terms.terms_bpd,
            prior_bpd=terms.prior_bpd,
            decoder_bpd=terms.terms_bpd[:, 0].copy(),
            rate_bpd=terms.terms_bpd[:, 1:].sum(axis=1) + terms.prior_bpd,
            x_start_mse=terms.x_start_mse,
            cumulative_rate_bpd=cumulative_rate_bpd(terms.terms_bpd, terms.prior_bpd).mean(axis=0),
            distortion_rmse=distortion_rmse(terms.x_start_mse),
        )

    def rate_distortion(self) -> "RateDistortionOutput":
        """The rate-distortion curve of these images (paper Fig. 5, Table 4), averaged over them."""
        return RateDistortionOutput(
            timesteps=np.arange(self.terms_bpd.shape[1]),
            rate_bpd=self.cumulative_rate_bpd,
            distortion_rmse=self.distortion_rmse,
            total_rate_bpd=float(self.rate_bpd.mean()),
            total_distortion_bpd=float(self.decoder_bpd.mean()),
        )


@dataclass
class RateDistortionOutput(BaseOutput):
    """Output of [`DDPMPaperPipeline.rate_distortion`] (paper Fig. 5 and Table 4), averaged over the images.

    Args:
        timesteps (`np.ndarray` of shape `(num_train_timesteps,)`): t = 0..T-1.
        rate_bpd (`np.ndarray` of shape `(num_train_timesteps,)`): Rate received from T down to t, bits/dim.
        distortion_rmse (`np.ndarray` of shape `(num_train_timesteps,)`): RMSE of x_0 from x_t, 0..255 scale.
        total_rate_bpd (`float`): L_T + ... + L_1, bits/dim (paper CIFAR-10: 1.78).
        total_distortion_bpd (`float`): L_0, bits/dim (paper CIFAR-10: 1.97).
    """

    timesteps: np.ndarray
    rate_bpd: np.ndarray
    distortion_rmse: np.ndarray
    total_rate_bpd: float
    total_distortion_bpd: float


@dataclass
class ReconstructionOutput(BaseOutput):
    """Output of [`DDPMPaperPipeline.reconstruct`] (paper Fig. 7).

    Args:
        x_t (`np.ndarray` of shape `(num_images, height, width, channels)`): The shared x_t, in [0, 1] (clipped).
        images (`np.ndarray` of shape `(num_images, num_samples, height, width, channels)`):
            Samples of p_theta(x_0 | x_t), in [0, 1].
        timestep (`int`): The step t that x_t was drawn at.
    """

    x_t: np.ndarray
    images: np.ndarray
    timestep: int


@dataclass
class InterpolationOutput(BaseOutput):
    """Output of [`DDPMPaperPipeline.interpolate`] (paper Fig. 8-9).

    Args:
        images (`np.ndarray` of shape `(num_lambdas, height, width, channels)`): The decoded interpolants, in [0, 1].
        lambdas (`np.ndarray` of shape `(num_lambdas,)`): The mixing weights, 0 = first image.
        timestep (`int`): The step t the interpolation happens at.
    """

    images: np.ndarray
    lambdas: np.ndarray
    timestep: int
