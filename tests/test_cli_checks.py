"""Every flag and every model is checked before any work, with one message and no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_plugin.cli import main
from ddpm_plugin.training_config import ConfigError, TrainingConfig


@pytest.mark.parametrize("command, flag, value", [
    (["train"], "--learning-rate", "inf"),
    (["train"], "--ema-decay", "nan"),
    (["train"], "--adam-epsilon", "-inf"),
    (["sample", "--scheduler", "ddim"], "--eta", "inf"),
    (["sample", "--scheduler", "ddim"], "--eta", "NaN"),
    (["export", "--output", "x"], "--tolerance", "nan"),
])
def test_every_float_flag_refuses_non_finite_values(capsys, command, flag, value):
    with pytest.raises(SystemExit) as exit:
        main([*command, f"{flag}={value}"])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and f"argument {flag}: must be a finite number, got '{value}'" in error


@pytest.mark.parametrize("name, value", [("learning_rate", float("inf")), ("dropout", float("nan")),
                                         ("adam_beta1", float("nan"))])
def test_training_config_refuses_non_finite_values_from_python(name, value):
    with pytest.raises(ConfigError, match=f"`{name}` must be a finite number"):
        TrainingConfig(preset="digits", **{name: value}).resolve()


def test_sample_inference_steps_beyond_the_schedule_are_refused_before_the_first_step(tmp_path, capsys):
    output = tmp_path / "run"
    code = main(["train", "--preset", "digits", "--max-steps", "40", "--sample-every", "20",
                 "--sample-inference-steps", "5000", "--output-dir", str(output)])
    assert code == 2
    assert "--sample-inference-steps must be at most the 1000 timesteps of the training schedule, got 5000." in capsys.readouterr().err
    assert not output.exists()  # refused before any folder, step or checkpoint


@pytest.mark.parametrize("scale", ["1000000", "0", "33"])
def test_sample_scale_is_bounded_with_a_clear_message(capsys, scale):
    with pytest.raises(SystemExit) as exit:
        main(["sample", "--scale", scale])
    assert exit.value.code == 2
    assert f"argument --scale: must be a whole number in 1..32, got '{scale}'" in capsys.readouterr().err


@pytest.fixture
def diverged_pipeline(tiny_pipeline_dir, tmp_path) -> Path:
    """A copy of the tiny pipeline whose UNet holds infinities and NaNs, as a run trained with `inf` once saved."""
    from safetensors.numpy import load_file, save_file

    folder = Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "diverged"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name].flat[:2] = [float("inf"), float("nan")]
    save_file(tensors, weights)
    return folder


def test_sampling_non_finite_weights_is_refused_naming_them(diverged_pipeline, tmp_path, capsys):
    code = main(["sample", "--model", str(diverged_pipeline), "--steps", "2", "--output", str(tmp_path / "grid.png")])
    error = capsys.readouterr().err
    assert code == 2 and "2 non-finite weights (NaN or infinity) in 1 tensors" in error, error
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("field, value", [("sample_size", 100000), ("sample_size", 4000)])
def test_a_pipeline_config_asking_for_more_memory_than_there_is_is_refused_naming_the_field(
    tiny_pipeline_dir, tmp_path, field, value
):
    folder = Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "huge"))
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    result = subprocess.run(
        ["prlimit", f"--as={8 << 30}", sys.executable, "-m", "ddpm_plugin.cli", "sample", "--model", str(folder),
         "--backend", "pytorch", "--steps", "2", "--output", str(tmp_path / "grid.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert f"config.json `sample_size` {value}" in result.stderr and "more than this machine can hold" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_schedule_of_300_million_timesteps_is_refused_naming_the_field(tiny_pipeline_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "long"))
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 300_000_000}))
    code = main(["sample", "--model", str(folder), "--backend", "pytorch", "--steps", "2", "--output",
                 str(tmp_path / "grid.png")])
    error = capsys.readouterr().err
    assert code == 2 and "`num_train_timesteps` 300000000 needs" in error, error


def test_a_refused_export_prints_one_message_without_a_traceback(tmp_path, capsys):
    from ddpm_plugin.bundled import DIGITS_MODEL

    code = main(["export", "--model", str(DIGITS_MODEL / "onnx"), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and "is not a pipeline folder" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_refused_export_folder_prints_one_message(tmp_path, capsys):
    from ddpm_plugin.bundled import DIGITS_MODEL

    folder = Path(shutil.copytree(DIGITS_MODEL / "onnx", tmp_path / "onnx"))
    (folder / "ddpm_onnx.json").write_text("[1, 2]")
    code = main(["sample", "--model", str(folder), "--output", str(tmp_path / "grid.png")])
    error = capsys.readouterr().err
    assert code == 2 and "ddpm_onnx.json must hold a JSON object, got list" in error
