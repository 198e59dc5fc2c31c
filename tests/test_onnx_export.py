"""ONNX export: the folder layout, validation against PyTorch with both exporters, refused settings, the weights
hash that recognises a stale export, and `ddpm export`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import UNet2DModel

from ddpm_plugin.export.freshness import StaleExportError, check_export_fresh, file_sha256
from ddpm_plugin.export.onnx_export import OnnxValidationError, detect_preset, export_onnx


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def export_report(request, tiny_pipeline_dir, tmp_path_factory):
    return export_onnx(tiny_pipeline_dir, tmp_path_factory.mktemp("export") / "onnx", seed=0, exporter=request.param)


def test_export_writes_the_documented_folder(export_report, tiny_pipeline_dir):
    folder = export_report.output_dir
    assert sorted(p.name for p in folder.iterdir()) == [
        "ddpm_onnx.json", "diffusion_coefficients.json", "model.onnx", "scheduler"
    ]
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == json.loads(
        (tiny_pipeline_dir / "scheduler" / "scheduler_config.json").read_text()
    )
    metadata = json.loads((folder / "ddpm_onnx.json").read_text())
    assert metadata["sample_size"] == 8 and metadata["in_channels"] == 1
    assert metadata["exporter"] == export_report.exporter
    assert metadata["opset"] == export_report.opset == {"dynamo": 18, "torchscript": 17}[export_report.exporter]
    assert metadata["fp16"] is False and metadata["max_abs_error"] == export_report.max_abs_error
    assert metadata["precision"] == export_report.precision == "fp32" and "quality" not in metadata
    assert metadata["source_model"] == str(tiny_pipeline_dir.resolve())
    assert metadata["source_weights_sha256"] == file_sha256(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert metadata["ddpm_plugin_version"]


def test_exported_model_matches_pytorch_at_every_batch_size(export_report, tiny_pipeline_dir):
    """Checked here independently of the export's own validation: other inputs, other batch sizes."""
    model = onnx.load(str(export_report.model_path))
    sample, timestep = model.graph.input
    dims = [d.dim_param or d.dim_value for d in sample.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 8, 8]
    assert timestep.type.tensor_type.elem_type == onnx.TensorProto.INT64
    unet = UNet2DModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").eval()
    session = ort.InferenceSession(str(export_report.model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch_size in (1, 5):
        x = rng.standard_normal((batch_size, 1, 8, 8), dtype=np.float32)
        t = rng.integers(0, 1000, batch_size)
        (eps,) = session.run(None, {"sample": x, "timestep": t})
        with torch.no_grad():
            expected = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
        assert np.abs(expected).max() > 0.1  # a live network, so the comparison means something
        np.testing.assert_allclose(eps, expected, atol=1e-4, rtol=0)


def test_reshape_targets_are_constants_so_no_shape_arithmetic_runs_per_step(export_report):
    model = onnx.load(str(export_report.model_path))
    constants = {init.name for init in model.graph.initializer} | {
        node.output[0] for node in model.graph.node if node.op_type == "Constant"
    }
    reshapes = [node for node in model.graph.node if node.op_type == "Reshape"]
    assert reshapes and all(node.input[1] in constants for node in reshapes)


def test_weights_that_are_float16_are_stored_as_float16_and_give_identical_outputs(tiny_pipeline_dir, tmp_path):
    """A model saved in half precision (as the bundled MNIST model is) exports at about half the size, with
    outputs bit-identical to the same graph holding float32 weights; float32-trained weights stay float32."""
    shutil.copytree(tiny_pipeline_dir, tmp_path / "pipeline")
    UNet2DModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").half().save_pretrained(tmp_path / "pipeline" / "unet")
    full = export_onnx(tiny_pipeline_dir, tmp_path / "full", exporter="torchscript")
    half = export_onnx(tmp_path / "pipeline", tmp_path / "half", exporter="torchscript")
    assert json.loads((full.output_dir / "ddpm_onnx.json").read_text())["float16_stored_weights"] == 0
    stored = json.loads((half.output_dir / "ddpm_onnx.json").read_text())["float16_stored_weights"]
    model = onnx.load(str(half.model_path))
    halves = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT16]
    assert stored == len(halves) > 10
    assert half.model_path.stat().st_size < 0.6 * full.model_path.stat().st_size

    # The same graph with the float16 weights widened back into float32 initializers.
    casts = {node.output[0]: node.input[0] for node in model.graph.node
             if node.op_type == "Cast" and node.input[0].endswith("__float16")}
    widened = {init.name: init for init in halves}
    for name, source in casts.items():
        weights = onnx.numpy_helper.to_array(widened[source]).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(weights, name))
    kept = [node for node in model.graph.node if node.output[0] not in casts]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    kept = [init for init in model.graph.initializer if init.name not in widened]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    rng = np.random.default_rng(3)
    feeds = {"sample": rng.standard_normal((4, 1, 8, 8), dtype=np.float32), "timestep": rng.integers(0, 1000, 4)}
    (stored_eps,) = ort.InferenceSession(str(half.model_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    (widened_eps,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(stored_eps, widened_eps)


def test_export_over_the_tolerance_leaves_nothing_and_keeps_an_earlier_export(tiny_pipeline_dir, tmp_path):
    with pytest.raises(OnnxValidationError, match="exceeds the tolerance"):
        export_onnx(tiny_pipeline_dir, tmp_path / "onnx", tolerance=1e-12, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []
    good = export_onnx(tiny_pipeline_dir, tmp_path / "onnx", exporter="torchscript")
    before = {p.name: p.read_bytes() for p in good.output_dir.rglob("*") if p.is_file()}
    with pytest.raises(OnnxValidationError):
        export_onnx(tiny_pipeline_dir, tmp_path / "onnx", tolerance=1e-12, exporter="torchscript")
    assert {p.name: p.read_bytes() for p in good.output_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--opset", "5"], "writes opsets 18..23, got --opset 5"),
    (["--opset", "99"], "writes opsets 18..23, got --opset 99"),
    (["--exporter", "torchscript", "--opset", "9"], "writes opsets 11..20, got --opset 9"),
    (["--tolerance", "0"], "must be a positive number"),
    (["--tolerance", "-1"], "must be a positive number"),
    (["--tolerance", "nan"], "argument --tolerance: must be a finite number, got 'nan'"),
    (["--quantize", "int8", "--keep-float", "conv_in,decoder"], "unknown layer group(s) decoder"),
    (["--quantize", "int8", "--quality-budget", "0"], "must be a fraction in (0, 1]"),
    (["--quantize", "int8", "--calibration-inputs", "0"], "must be a whole number >= 1"),
    (["--quantize", "int8", "--fp16"], "not allowed with argument"),
    (["--keep-float", "conv_in"], "only apply with --quantize int8"),
    (["--quantize", "int8", "--float32-below-t", "-1"], "must be a whole number >= 0"),
    (["--float32-below-t", "10"], "only apply with --quantize int8"),
])
def test_refused_export_settings_get_one_line_and_write_nothing(flags, message, tiny_pipeline_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_plugin.cli", "export", "--model", str(tiny_pipeline_dir),
         "--output", str(tmp_path / "out" / "onnx"), *flags], capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_a_folder_that_is_not_a_pipeline_and_writing_over_the_pipeline(tmp_path, tiny_pipeline_dir):
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        export_onnx(tmp_path, tmp_path / "onnx")
    with pytest.raises(ValueError, match="its own folder"):
        export_onnx(tiny_pipeline_dir, tiny_pipeline_dir)


def test_detect_preset_names_the_architecture():
    from ddpm_plugin.presets import PRESETS

    assert detect_preset(PRESETS["digits"].unet_config()) == "digits"
    assert detect_preset(PRESETS["cifar10"].unet_config(dropout=0.0)) == "cifar10"
    assert detect_preset(PRESETS["digits"].unet_config(block_out_channels=(16, 32))) is None


def test_an_export_is_stale_once_its_pipeline_is_retrained(tiny_pipeline_dir, tiny_pipeline_factory, tmp_path):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    report = export_onnx(pipeline, pipeline / "onnx", exporter="torchscript")
    metadata = json.loads((report.output_dir / "ddpm_onnx.json").read_text())
    check_export_fresh(report.output_dir, metadata)  # fresh: passes
    tiny_pipeline_factory(seed=1).save_pretrained(pipeline)  # retrained: other weights in the same folder
    with pytest.raises(StaleExportError, match="re-export it: ddpm export"):
        check_export_fresh(report.output_dir, metadata)
    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

    with pytest.raises(StaleExportError, match="retrained after the export"):  # the sampler refuses it too
        OnnxDDPMPipeline.from_pretrained(pipeline, provider="cpu")
    moved = tmp_path / "moved-onnx"
    shutil.copytree(report.output_dir, moved)  # an export without its source folder cannot be checked
    check_export_fresh(moved, json.loads((moved / "ddpm_onnx.json").read_text()))


def test_cli_export_writes_an_export_inside_the_pipeline_folder(tiny_pipeline_dir, tmp_path, capsys):
    from ddpm_plugin.cli import main

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    assert main(["export", "--model", str(pipeline), "--output", str(pipeline / "onnx"), "--opset", "19"]) == 0
    out = capsys.readouterr().out
    assert "max |eps_onnx - eps_torch|" in out and "dynamo exporter" in out
    metadata = json.loads((pipeline / "onnx" / "ddpm_onnx.json").read_text())
    assert metadata["opset"] == 19 and metadata["source_model"] == ".."


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fp16_export_keeps_float32_inputs_and_outputs(tiny_pipeline_dir, tmp_path, exporter):
    report = export_onnx(tiny_pipeline_dir, tmp_path / "onnx16", fp16=True, seed=0, exporter=exporter)
    model = onnx.load(str(report.model_path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert report.fp16 and report.max_abs_error <= report.tolerance == 5e-2
    assert json.loads((report.output_dir / "ddpm_onnx.json").read_text())["precision"] == report.precision == "fp16"


def test_export_writes_the_float64_coefficients_beside_the_model(export_report, tiny_pipeline_dir):
    """Samplers outside Python (the browser page) read the schedule from the export, bit for bit."""
    from ddpm_plugin.export.coefficients import COEFFICIENTS_FILE, diffusion_coefficients

    written = json.loads((export_report.output_dir / COEFFICIENTS_FILE).read_text())
    config = json.loads((tiny_pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    assert written == diffusion_coefficients(config)
