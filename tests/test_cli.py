import subprocess
import sys

import diffusers
import pytest

from PIL import Image

from ddpm_plugin.cli import main


def test_info_prints_the_paper_parameter_counts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "| cifar10 | 32x32x3 | 35,746,307 |" in out
    assert "| celebahq | 256x256x3 | 113,673,219 |" in out
    assert f"diffusers: {diffusers.__version__}" in out  # the installed release, whichever it is


def test_sample_writes_a_png_grid(tiny_pipeline_dir, tmp_path):
    output = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_plugin.cli", "sample", "--model", str(tiny_pipeline_dir), "--num-images", "4",
         "--steps", "10", "--seed", "3", "--scheduler", "ddim", "--scale", "2", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    grid = Image.open(output)
    # 2x2 tiles of 8x8 with 1-pixel padding, upscaled twice.
    assert grid.size == (2 * (2 * 9 + 1), 2 * (2 * 9 + 1))
    assert "100%" in result.stderr  # the progress bar ran to the end


def test_sample_rejects_bad_steps_and_missing_models(tiny_pipeline_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--steps", "0", "--output", str(tmp_path / "x.png")]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--steps", "1001", "--output", str(tmp_path / "x.png")]) == 2
    assert "num_inference_steps" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    assert "missing: no such folder; give a pipeline folder, a `ddpm train` run folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/missing/grid.png"], "the folder {tmp}/missing does not exist"),
    (["--output", "{tmp}"], "is a folder"),
    (["--output", "{tmp}/grid.txt"], "unknown picture type '.txt'"),
    (["--output", "{tmp}/grid"], "unknown picture type '(none)'"),
    (["--eta", "-0.5", "--scheduler", "ddim"], "--eta must be a finite number >= 0"),
    (["--eta", "0.5"], "the DDPM sampler has none"),
    (["--seed", "-1"], "--seed must be in 0.."),
    (["--seed", str(2**64)], "--seed must be in 0.."),
    (["--num-images", "0"], "--num-images must be a positive integer"),
    (["--batch-size", "0", "--output-dir", "{tmp}/shards"], "--batch-size must be a positive integer"),
])
def test_sample_checks_every_flag_before_any_work(tiny_pipeline_dir, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    output = [] if {"--output", "--output-dir"} & set(args) else ["--output", str(tmp_path / "grid.png")]
    code = main(["sample", "--model", str(tiny_pipeline_dir), "--steps", "1000", *output, *args])
    error = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in error, error
    assert "it/s" not in error and "Loading pipeline" not in error  # refused before loading or sampling
    assert [p.name for p in tmp_path.iterdir()] == []
