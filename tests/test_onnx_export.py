"""ONNX export: the folder layout, validation against PyTorch, and `ddpm export`."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ddpm_plugin.export.onnx_export import OnnxValidationError, detect_preset, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def export_report(tiny_pipeline_dir, tmp_path_factory):
    return export_onnx(tiny_pipeline_dir, tmp_path_factory.mktemp("export") / "onnx", seed=0)


def test_export_writes_the_documented_folder(export_report, tiny_pipeline_dir):
    folder = export_report.output_dir
    assert (folder / "model.onnx").is_file()
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == json.loads(
        (tiny_pipeline_dir / "scheduler" / "scheduler_config.json").read_text()
    )
    metadata = json.loads((folder / "ddpm_onnx.json").read_text())
    assert metadata["sample_size"] == 8 and metadata["in_channels"] == 1
    assert metadata["opset"] == export_report.opset == 17 and metadata["fp16"] is False
    assert metadata["max_abs_error"] == export_report.max_abs_error
    assert metadata["source_model"] == str(tiny_pipeline_dir.resolve())
    assert metadata["ddpm_plugin_version"]


def test_export_agrees_with_pytorch_on_random_inputs(export_report):
    assert 0 <= export_report.max_abs_error <= 1e-4 == export_report.tolerance


def test_exported_model_has_dynamic_batch_and_int64_timestep(export_report):
    model = onnx.load(str(export_report.model_path))
    sample, timestep = model.graph.input
    dims = [d.dim_param or d.dim_value for d in sample.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 8, 8]
    assert timestep.type.tensor_type.elem_type == onnx.TensorProto.INT64
    session = ort.InferenceSession(str(export_report.model_path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 5):
        (eps,) = session.run(None, {"sample": np.zeros((batch_size, 1, 8, 8), np.float32),
                                    "timestep": np.arange(batch_size, dtype=np.int64)})
        assert eps.shape == (batch_size, 1, 8, 8)


def test_reshape_targets_are_constants_so_no_shape_arithmetic_runs_per_step(export_report):
    model = onnx.load(str(export_report.model_path))
    constants = {init.name for init in model.graph.initializer} | {
        node.output[0] for node in model.graph.node if node.op_type == "Constant"
    }
    reshapes = [node for node in model.graph.node if node.op_type == "Reshape"]
    assert reshapes and all(node.input[1] in constants for node in reshapes)


def test_export_fails_loudly_over_the_tolerance_and_leaves_no_model(tiny_pipeline_dir, tmp_path):
    with pytest.raises(OnnxValidationError, match="exceeds the tolerance"):
        export_onnx(tiny_pipeline_dir, tmp_path / "onnx", tolerance=1e-12)
    assert not list((tmp_path / "onnx").glob("model.onnx*"))
    assert not (tmp_path / "onnx" / "ddpm_onnx.json").exists()


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


def test_cli_export_writes_an_export_inside_the_pipeline_folder(tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    from ddpm_plugin.cli import main

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    assert main(["export", "--model", str(pipeline), "--output", str(pipeline / "onnx"), "--opset", "18"]) == 0
    assert "max |eps_onnx - eps_torch|" in capsys.readouterr().out
    metadata = json.loads((pipeline / "onnx" / "ddpm_onnx.json").read_text())
    assert metadata["opset"] == 18 and metadata["source_model"] == ".."


@pytest.mark.slow
def test_fp16_export_keeps_float32_inputs_and_outputs(tiny_pipeline_dir, tmp_path):
    report = export_onnx(tiny_pipeline_dir, tmp_path / "onnx16", fp16=True, seed=0)
    model = onnx.load(str(report.model_path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert report.fp16 and report.max_abs_error <= report.tolerance == 5e-2
