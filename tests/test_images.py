"""The NumPy image helpers the ONNX Runtime sampler and the demo share: model space to pixels and the
denoising snapshots of paper Fig. 6."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_plugin.images import (
    SnapshotRecorder,
    evenly_spaced_steps,
    every_k_steps,
    to_image,
    to_pil_images,
)


def test_to_image_maps_model_space_to_nhwc_in_0_1():
    sample = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=np.float64).reshape(1, 1, 1, 5)
    image = to_image(sample)
    assert image.shape == (1, 1, 5, 1) and image.dtype == np.float32
    np.testing.assert_array_equal(image.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_to_pil_images_makes_gray_pictures_of_one_channel_and_rgb_of_three():
    gray, rgb = to_pil_images(np.ones((1, 4, 4, 1))), to_pil_images(np.zeros((2, 4, 4, 3), np.float32))
    assert [picture.mode for picture in gray + rgb] == ["L", "RGB", "RGB"]
    assert gray[0].getpixel((0, 0)) == 255


@pytest.mark.parametrize("num_steps, every, expected", [(10, 5, {4, 9}), (7, 3, {2, 5, 6}), (3, 5, {2})])
def test_every_k_steps_keeps_each_kth_step_and_the_last(num_steps, every, expected):
    assert every_k_steps(num_steps, every) == expected


@pytest.mark.parametrize("num_steps, count, expected", [(1000, 3, {0, 500, 999}), (2, 8, {0, 1}), (1, 8, {0})])
def test_evenly_spaced_steps_keep_the_first_and_the_last(num_steps, count, expected):
    assert evenly_spaced_steps(num_steps, count) == expected


def test_snapshot_recorder_keeps_the_chosen_steps_as_images():
    recorder = SnapshotRecorder({1, 3})
    for i, t in enumerate([30, 20, 10, 0]):
        x_t = np.full((2, 1, 4, 4), -1.0 + i / 2, np.float32)
        recorder(i, t, x_t, -x_t)
    x_t, pred_original_sample = recorder.stacked()
    assert recorder.timesteps == [20, 0]
    assert x_t.shape == pred_original_sample.shape == (2, 2, 4, 4, 1)
    np.testing.assert_array_equal(x_t[:, 0, 0, 0, 0], [0.25, 0.75])
    np.testing.assert_array_equal(pred_original_sample[:, 0, 0, 0, 0], [0.75, 0.25])
