"""The OpenVINO engine: the same float32 export on OpenVINO's CPU runtime, in float32 (equal to onnxruntime's eps)
and in bf16 with the float32 compilation below t = `BF16_FLOAT32_BELOW_T`; buffers shared, not copied."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ddpm_plugin.bundled import DIGITS_MODEL
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline, OnnxModelError
from ddpm_plugin.export.sampler import open_sampler
from ddpm_plugin.vocabulary import BF16_FLOAT32_BELOW_T, ONNX_METADATA_FILE

pytest.importorskip("openvino", reason="the OpenVINO engine needs `pip install ddpm-plugin[openvino]`")


@pytest.fixture(scope="module")
def engines():
    onnxruntime = OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL, provider="cpu", num_threads=1)
    fp32 = OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL, engine="openvino", num_threads=1)
    bf16 = OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL, engine="openvino", precision="bf16", num_threads=1)
    return onnxruntime, fp32, bf16


def eps(pipe, x, t):
    unet = pipe.bound_unet(x.shape[0])
    np.copyto(unet.sample, x)
    return unet(t).copy()


def test_openvino_fp32_gives_onnxruntimes_eps(engines):
    onnxruntime, fp32, _ = engines
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)
    for t in (0, 9, 10, 500, 999):
        np.testing.assert_allclose(eps(fp32, x, t), eps(onnxruntime, x, t), rtol=0, atol=2e-5)


def test_openvino_bf16_runs_float32_below_its_threshold_and_bf16_above(engines):
    onnxruntime, fp32, bf16 = engines
    assert bf16.float32_below_t == BF16_FLOAT32_BELOW_T > 0 and fp32.float32_below_t == 0
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(eps(bf16, x, BF16_FLOAT32_BELOW_T - 1), eps(fp32, x, BF16_FLOAT32_BELOW_T - 1))
    above, exact = eps(bf16, x, 500), eps(onnxruntime, x, 500)
    error = np.abs(above - exact).max()
    assert 0 < error < 0.1 * np.abs(exact).max()  # bf16 rounding: visible, and small


def test_the_bound_unet_returns_its_shared_output_buffer_and_reads_its_input_in_place(engines):
    _, fp32, _ = engines
    unet = fp32.bound_unet(2)
    assert fp32.bound_unet(2) is unet  # compiled once per batch size
    first = unet(100)
    assert first is unet.noise_pred
    before = first.copy()
    unet.sample[:] = 0.5  # a new x_t written in place is what the next call reads
    assert not np.array_equal(unet(100), before)


def test_openvino_fp32_samples_like_onnxruntime(engines):
    onnxruntime, fp32, _ = engines
    for scheduler, steps in (("ddim", 20), ("dpmsolver++", 10), ("ddpm", 50)):
        expected = onnxruntime(2, steps, scheduler=scheduler, seed=3, progress_bar=False).images
        actual = fp32(2, steps, scheduler=scheduler, seed=3, progress_bar=False).images
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_open_sampler_names_the_engine_and_precision():
    sampler = open_sampler("digits", "openvino", "ddim", 10, precision="bf16", progress_bar=False)
    assert sampler.backend == "openvino"
    assert sampler.precision == f"bf16, float32 below t={BF16_FLOAT32_BELOW_T}"
    assert sampler.pipe.providers[0].startswith("OpenVINO")
    assert sampler(0, 2).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="no bf16 path"):
        open_sampler("digits", "onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="runs on the CPU"):
        open_sampler("digits", "openvino", device="cuda")


def test_onnxruntime_options_and_non_float32_exports_are_refused_on_openvino(tmp_path):
    with pytest.raises(ValueError, match="onnxruntime's"):
        OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL, engine="openvino", provider="cuda")
    with pytest.raises(ValueError, match="OpenVINO engine's"):
        OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL, precision="bf16")
    with pytest.raises(ValueError, match="`engine` must be one of"):
        OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL, engine="tensorrt")
    export = tmp_path / "onnx"
    shutil.copytree(DIGITS_MODEL / "onnx", export)
    metadata = json.loads((export / ONNX_METADATA_FILE).read_text())
    (export / ONNX_METADATA_FILE).write_text(json.dumps({**metadata, "precision": "fp16", "fp16": True}))
    with pytest.raises(OnnxModelError, match="fp16 export; the OpenVINO engine runs a float32 export"):
        OnnxDDPMPipeline.from_pretrained(export, engine="openvino")
