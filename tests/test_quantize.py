"""int8 export: time-step-aware calibration inputs, the layer groups kept in float, the quality budget, and the
quantized graph sampling torch-free within budget on the bundled digits model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ddpm_plugin.bundled import DIGITS_MODEL
from ddpm_plugin.evaluation import dataset_images
from ddpm_plugin.export.onnx_export import OnnxValidationError, export_onnx
from ddpm_plugin.export.quantize import (
    DEFAULT_BOUND_BUDGET,
    DEFAULT_FLOAT32_BELOW_T,
    Int8Settings,
    denoising_inputs,
    eps_error_weights,
    last_up_block_index,
    layer_group,
    predict_eps,
    quantization_quality,
    scheduled_eps,
)
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion

REPO = Path(__file__).resolve().parent.parent
# Sample agreement asked of the int8 graph on the bundled model: DDIM from the same x_T, mean |x_int8 - x_fp32|
# in pixel levels (0..255). Measured: see test_int8_export_samples_torch_free_like_the_float32_export.
MAX_MEAN_PIXEL_DIFFERENCE = 4.0


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_config(json.loads((DIGITS_MODEL / "scheduler" / "scheduler_config.json").read_text()))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return dataset_images("digits", (1, 8, 8), None, seed=0)[0]


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """The bundled digits model exported in int8 (TorchScript exporter: the faster one to export). The oldest
    onnxruntime the package supports quantizes this model beyond the budget, and the export refuses it with its
    message: the tests of the int8 graph's quality then skip, saying so."""
    try:
        return export_onnx(DIGITS_MODEL, tmp_path_factory.mktemp("int8") / "onnx", exporter="torchscript", seed=0,
                           quantize=Int8Settings())
    except OnnxValidationError as error:
        pytest.skip(f"onnxruntime {ort.__version__}'s int8 quantizer exceeds the quality budget on the bundled "
                    f"digits model, and the export refuses it: {error}")


def test_calibration_inputs_cover_every_part_of_the_t_range_and_follow_eq_4(diffusion, digits):
    inputs = denoising_inputs(digits, diffusion, 16, seed=0)
    strata = np.arange(16)
    t = np.sort(inputs.timestep)  # one t in each sixteenth of 0..999
    assert np.all((np.floor(strata * 1000 / 16) <= t) & (t < np.ceil((strata + 1) * 1000 / 16)))
    assert inputs.sample.dtype == np.float32 and inputs.timestep.dtype == np.int64
    # x_t is Eq. 4 of some digit: solving for x_0 gives an image on the 0..255 grid mapped to [-1, 1].
    x_start = diffusion.predict_start_from_noise(inputs.sample.astype(np.float64), inputs.timestep, inputs.noise.astype(np.float64))
    pixels = (x_start + 1) * 127.5
    assert np.abs(pixels - np.round(pixels)).max() < 0.05 and pixels.min() > -0.5 and pixels.max() < 255.5


def test_weighted_inputs_put_t_where_the_bound_weighs_the_eps_error(diffusion, digits):
    lambda_t = eps_error_weights(diffusion, "fixed_large")
    assert lambda_t[0] > 50 * lambda_t[200]  # Eq. 12's weight is largest at small t
    weighted = denoising_inputs(digits, diffusion, 1000, seed=0, t_weights=lambda_t)
    expected_share = lambda_t[:20].sum() / lambda_t.sum()
    assert abs(np.mean(weighted.timestep < 20) - expected_share) < 0.01
    assert np.mean(denoising_inputs(digits, diffusion, 1000, seed=0).timestep < 20) == pytest.approx(0.02, abs=0.005)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_layer_groups_are_found_in_both_exporters_graphs(exporter, tiny_pipeline_dir, tmp_path):
    report = export_onnx(tiny_pipeline_dir, tmp_path / "onnx", exporter=exporter, seed=0)
    model = onnx.load(str(report.model_path))
    last_up_block = last_up_block_index(model)
    groups: dict[str | None, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            groups.setdefault(layer_group(node, last_up_block), []).append(node.op_type)
    # The tiny digits UNet: one attention block in each of down/mid/up (q, k, v, out and two products: 6 MatMuls
    # each), time embedding MLP (2) plus one projection per resnet (1 + 1 down, 2 mid, 2 + 2 up).
    assert groups["conv_in"] == ["Conv"] and groups["conv_out"] == ["Conv"]
    assert sorted(set(groups["attention"])) == ["MatMul"] and len(groups["attention"]) % 6 == 0
    assert len(groups["time_embedding"]) == 2 + 8
    # Full resolution: the first down block's resnet (conv1, conv2) and downsampler; the last up block's two
    # resnets (conv1, conv2 and the 1x1 shortcut each, as their inputs carry the skip connections).
    assert last_up_block == 1
    assert groups["first_down_block"] == ["Conv"] * 3 and groups["last_up_block"] == ["Conv"] * 6
    assert set(groups[None]) == {"Conv"}


def test_int8_export_records_its_precision_and_quality_within_budget(int8_export):
    metadata = json.loads((int8_export.output_dir / "ddpm_onnx.json").read_text())
    assert metadata["precision"] == int8_export.precision == "int8" and metadata["fp16"] is False
    assert metadata["quantization"]["keep_float"] == ["conv_in", "conv_out"]
    assert metadata["quantization"]["calibration_data"] == "digits"  # from the model's training_config.json
    assert metadata["quantization"]["calibration_timesteps"][0] < 10 and metadata["quantization"]["calibration_timesteps"][1] > 990
    quality = metadata["quality"]
    assert quality == int8_export.quality and 0 < quality["bound_rise"] <= quality["budget"] == DEFAULT_BOUND_BUDGET
    model = onnx.load(str(int8_export.model_path))
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) > 20
    weights = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert weights and any(len(init.dims) == 4 for init in weights)  # conv weights stored as int8


def test_int8_eps_error_stays_within_budget_on_fresh_held_out_inputs(int8_export, diffusion, digits):
    """Measured here independently of the export's own check: other noise, other t, the schedule the export runs
    (its float32 graph below `float32_below_t`)."""
    fp32 = DIGITS_MODEL / "onnx" / "model.onnx"
    lambda_t = eps_error_weights(diffusion, "fixed_large")
    uniform = denoising_inputs(digits, diffusion, 512, seed=11)
    weighted = denoising_inputs(digits, diffusion, 512, seed=12, t_weights=lambda_t)
    below = json.loads((int8_export.output_dir / "ddpm_onnx.json").read_text())["float32_below_t"]
    quality = quantization_quality(
        uniform, (predict_eps(int8_export.model_path, uniform), predict_eps(fp32, uniform)),
        weighted, (predict_eps(int8_export.model_path, weighted), predict_eps(fp32, weighted)),
        diffusion.num_timesteps, DEFAULT_BOUND_BUDGET, float32_below_t=below,
    )
    assert quality.within_budget, quality
    assert 0 < quality.eps_relative_rms < 0.05 and quality.loss_rise < DEFAULT_BOUND_BUDGET


def test_int8_export_samples_torch_free_like_the_float32_export(int8_export):
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        sys.modules["diffusers"] = None
        import numpy as np
        from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
        int8 = OnnxDDPMPipeline.from_pretrained({str(int8_export.output_dir)!r}, num_threads=1)
        fp32 = OnnxDDPMPipeline.from_pretrained({str(DIGITS_MODEL / "onnx")!r}, num_threads=1)
        latents = np.random.default_rng(0).standard_normal((64, 1, 8, 8), dtype=np.float32)
        run = lambda pipe: pipe(64, 50, scheduler="ddim", latents=latents, progress_bar=False).images * 255
        difference = np.abs(run(int8) - run(fp32))
        print(json.dumps({{"mean": float(difference.mean()), "max": float(difference.max())}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    difference = json.loads(result.stdout.splitlines()[-1])
    assert 0 < difference["mean"] <= MAX_MEAN_PIXEL_DIFFERENCE, difference


def test_int8_export_beyond_its_budget_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(OnnxValidationError, match="beyond the budget"):
        export_onnx(DIGITS_MODEL, tmp_path / "onnx", exporter="torchscript", quantize=Int8Settings(budget=1e-9))
    assert list(tmp_path.iterdir()) == []


def test_int8_export_needs_training_images(tiny_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="names no data set"):
        export_onnx(tiny_pipeline_dir, tmp_path / "onnx", exporter="torchscript", quantize=Int8Settings())
    assert list(tmp_path.iterdir()) == []


# --- Time-step-aware precision: the float32 graph for t < float32_below_t. ---


def test_scheduled_eps_takes_float32_below_t_and_int8_above(diffusion, digits):
    inputs = denoising_inputs(digits, diffusion, 64, seed=3)
    int8, fp32 = np.ones_like(inputs.noise), np.full_like(inputs.noise, 0.5)
    eps = scheduled_eps(inputs, int8, fp32, 500)
    assert np.array_equal(eps.reshape(64, -1).max(axis=1), np.where(inputs.timestep >= 500, 1.0, 0.5))
    quality = quantization_quality(inputs, (int8, fp32), inputs, (int8, fp32), 1000, 0.03, float32_below_t=1000)
    assert quality.bound_rise == quality.loss_rise == 0 and quality.int8_everywhere_bound_rise != 0


def test_int8_export_keeps_its_float32_graph_for_small_t(int8_export):
    metadata = json.loads((int8_export.output_dir / "ddpm_onnx.json").read_text())
    assert metadata["float32_below_t"] == DEFAULT_FLOAT32_BELOW_T == metadata["quantization"]["float32_below_t"] == 10
    float32_graph = onnx.load(str(int8_export.output_dir / metadata["float32_model_file"]))
    assert not any(node.op_type == "QuantizeLinear" for node in float32_graph.graph.node)
    quality = metadata["quality"]  # the export prices the schedule the sampler runs
    assert quality["float32_below_t"] == 10 and 0 < quality["bound_rise"] < quality["int8_everywhere_bound_rise"]


def test_onnx_sampler_runs_the_float32_graph_below_float32_below_t(int8_export):
    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

    scheduled = OnnxDDPMPipeline.from_pretrained(int8_export.output_dir, num_threads=1)
    assert scheduled.float32_below_t == 10 and scheduled.float32_session is not None
    int8 = OnnxDDPMPipeline(scheduled.session, scheduled.scheduler_config, {**scheduled.metadata, "float32_below_t": 0})
    fp32 = OnnxDDPMPipeline(scheduled.float32_session, scheduled.scheduler_config, scheduled.metadata)
    x_t = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)

    def eps(pipe, t):
        unet = pipe.bound_unet(2)
        unet.sample[...] = x_t
        return unet(t).copy()

    for t in (0, 9):
        assert np.array_equal(eps(scheduled, t), eps(fp32, t)) and not np.array_equal(eps(scheduled, t), eps(int8, t))
    for t in (10, 999):
        assert np.array_equal(eps(scheduled, t), eps(int8, t))
    # DDIM-50's last step is t = 0: the one step that differs from int8 everywhere.
    latents = x_t[:1]
    run = lambda pipe: pipe(1, 50, scheduler="ddim", latents=latents, progress_bar=False).images  # noqa: E731
    assert not np.array_equal(run(scheduled), run(int8))


def test_int8_export_without_its_float32_graph_is_refused_clearly(int8_export, tmp_path):
    import shutil

    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline, OnnxModelError

    copy = shutil.copytree(int8_export.output_dir, tmp_path / "copy")
    metadata_file = copy / "ddpm_onnx.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "float32_below_t": "10"}))
    with pytest.raises(OnnxModelError, match="float32_below_t"):
        OnnxDDPMPipeline.from_pretrained(copy)
    metadata_file.write_text(json.dumps(metadata))
    (copy / "model.float32.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="model.float32.onnx"):
        OnnxDDPMPipeline.from_pretrained(copy)


def test_int8_at_every_t_on_request(tmp_path):
    # int8 at every t is over the default budget on the digits model: a looser budget lets the export through
    report = export_onnx(DIGITS_MODEL, tmp_path / "onnx", exporter="torchscript", seed=0,
                         quantize=Int8Settings(float32_below_t=0, budget=0.2))
    metadata = json.loads((report.output_dir / "ddpm_onnx.json").read_text())
    assert "float32_below_t" not in metadata and not (report.output_dir / "model.float32.onnx").exists()
    assert metadata["quality"]["bound_rise"] == metadata["quality"]["int8_everywhere_bound_rise"]


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_float32_below_t_setting_is_checked(value):
    with pytest.raises(ValueError, match="float32_below_t"):
        Int8Settings(float32_below_t=value)
