"""The paper's figures: progression (Fig. 6), reconstruction from a shared x_t (Fig. 7), interpolation (Fig. 8-9)
and the rate-distortion curve (Fig. 5), as pipeline outputs and as PNG files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation_fixtures import one_thread  # noqa: F401 (autouse fixture)
from ddpm_plugin.figures import (
    interpolation_strip,
    plot_rate_distortion,
    progression_grid,
    reconstruction_grid,
    save_figure,
)
from ddpm_plugin.pipelines.pipeline_ddpm_paper import RateDistortionOutput


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.round(load_digits().images[:4] * (255 / 16)).astype(np.uint8)  # [4, 8, 8]


def test_reconstruction_shares_x_t_and_draws_distinct_samples(tiny_pipeline, digits):
    out = tiny_pipeline.reconstruct(digits[:2], timestep=500, num_samples=3, generator=torch.manual_seed(0),
                                    num_inference_steps=50)
    assert out.timestep == 500
    assert out.x_t.shape == (2, 8, 8, 1) and out.images.shape == (2, 3, 8, 8, 1)
    assert not np.array_equal(out.images[0, 0], out.images[0, 1])  # one x_t, several x_0 ~ p(x_0 | x_t)


def test_reconstruction_from_step_zero_returns_the_image(tiny_pipeline, digits):
    # q(x_1 | x_0) has sigma 0.01 and the last step barely moves it: even an untrained model gives x_0 back.
    out = tiny_pipeline.reconstruct(digits[:2], timestep=0, num_samples=2, generator=torch.manual_seed(0))
    assert np.abs(out.images - digits[:2, None, ..., None] / 255.0).max() < 0.05


def test_timestep_moves_down_to_the_sampling_schedule(tiny_pipeline, digits):
    out = tiny_pipeline.reconstruct(digits[:1], timestep=999, num_samples=1, num_inference_steps=10)
    assert out.timestep == 900
    with pytest.raises(ValueError, match="timestep"):
        tiny_pipeline.reconstruct(digits[:1], timestep=1000)


def test_interpolation_decodes_every_lambda_with_the_same_noise(tiny_pipeline, digits):
    out = tiny_pipeline.interpolate(digits[0], digits[1], timestep=300, lambdas=[0.0, 0.0, 0.5, 1.0],
                                    generator=torch.manual_seed(0), num_inference_steps=20)
    assert out.images.shape == (4, 8, 8, 1) and out.timestep == 300
    np.testing.assert_array_equal(out.images[0], out.images[1])  # same latent and same reverse noise
    assert not np.array_equal(out.images[0], out.images[3])


def test_interpolation_at_step_zero_ends_at_both_images(tiny_pipeline, digits):
    out = tiny_pipeline.interpolate(digits[0], digits[1], timestep=0, lambdas=[0.0, 1.0], generator=torch.manual_seed(0))
    assert np.abs(out.images[0, ..., 0] - digits[0] / 255.0).max() < 0.05
    assert np.abs(out.images[1, ..., 0] - digits[1] / 255.0).max() < 0.05


def test_interpolation_rejects_lambdas_outside_0_1(tiny_pipeline, digits):
    with pytest.raises(ValueError, match="lambdas"):
        tiny_pipeline.interpolate(digits[0], digits[1], lambdas=[0.0, 1.5])


def test_figures_are_written_as_png_grids(tiny_pipeline, digits, test_output_dir):
    progression = tiny_pipeline.progressive_generation(batch_size=2, num_inference_steps=40, every=10,
                                                       generator=torch.manual_seed(0))
    grid = progression_grid(progression, scale=2)
    assert grid.size == ((4 * 9 + 1) * 2, (4 * 9 + 1) * 2)  # 4 snapshots across; x_t and x_0 rows for 2 images

    reconstruction = tiny_pipeline.reconstruct(digits[:2], timestep=200, num_samples=3, num_inference_steps=20,
                                               generator=torch.manual_seed(0))
    rec_grid = reconstruction_grid(reconstruction, originals=digits[:2], scale=1)
    assert rec_grid.size == (5 * 9 + 1, 2 * 9 + 1)  # x_0, x_t, 3 samples
    # The first column is the original image, pixel for pixel.
    np.testing.assert_array_equal(np.asarray(rec_grid)[1:9, 1:9], digits[0])

    rows = [tiny_pipeline.interpolate(digits[0], digits[1], timestep=t, lambdas=np.linspace(0, 1, 5),
                                      num_inference_steps=20, generator=torch.manual_seed(0)) for t in (0, 500)]
    strip = interpolation_strip(rows, scale=1)
    assert strip.size == (5 * 9 + 1, 2 * 9 + 1)

    for name, figure in [("progression", grid), ("reconstruction", rec_grid), ("interpolation", strip)]:
        path = save_figure(figure, test_output_dir / f"figure_{name}.png")
        assert Image.open(path).size == figure.size


def test_rate_distortion_figure_has_the_three_panels_of_fig_5(test_output_dir):
    t = np.arange(1000)
    curve = RateDistortionOutput(timesteps=t, rate_bpd=np.linspace(1.78, 0.0, 1000),
                                 distortion_rmse=np.linspace(0.95, 80.0, 1000),
                                 total_rate_bpd=1.78, total_distortion_bpd=1.97)
    figure = plot_rate_distortion(curve)
    assert len(figure.axes) == 3
    assert "3.75 bits/dim" in figure.get_suptitle()
    path = save_figure(figure, test_output_dir / "figure_rate_distortion.png")
    assert Image.open(path).size[0] > 1000


def test_interpolation_strip_needs_rows_of_equal_length(tiny_pipeline, digits):
    a = tiny_pipeline.interpolate(digits[0], digits[1], timestep=0, lambdas=[0, 1])
    b = tiny_pipeline.interpolate(digits[0], digits[1], timestep=0, lambdas=[0, 0.5, 1])
    with pytest.raises(ValueError, match="lambdas"):
        interpolation_strip([a, b])
