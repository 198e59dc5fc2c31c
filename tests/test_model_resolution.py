"""One resolver for every subcommand's --model: bundled names, pipeline folders, training run folders and ONNX
exports; `ddpm info` and ONNX sampling without torch; help that names the default the code uses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ddpm_plugin.bundled import DIGITS_MODEL, MNIST_MODEL, model_path, resolve_model
from ddpm_plugin.cli import main

REPO = Path(__file__).resolve().parent.parent
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` fails, as in a torch-free install


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH + code], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_model_path_gives_each_bundled_model_and_refuses_other_names():
    assert model_path("digits") == DIGITS_MODEL and model_path() == MNIST_MODEL == resolve_model(None)
    with pytest.raises(ValueError, match=r"`name` must be one of \['mnist', 'digits'\], got 'cifar10'"):
        model_path("cifar10")


def test_resolve_model_takes_names_run_folders_and_exports(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DIGITS_MODEL, run / "pipeline")
    assert resolve_model("digits") == DIGITS_MODEL
    assert resolve_model(run) == run / "pipeline"
    assert resolve_model(run / "pipeline" / "onnx") == run / "pipeline" / "onnx"
    with pytest.raises(FileNotFoundError, match="no such folder; give a pipeline folder, a `ddpm train` run folder"):
        resolve_model(tmp_path / "nothing")


def test_sample_takes_a_training_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(DIGITS_MODEL, run / "pipeline")
    assert main(["sample", "--model", str(run), "--num-images", "2", "--steps", "2", "--scheduler", "ddim",
                 "--output", str(tmp_path / "grid.png")]) == 0
    assert "(onnxruntime)" in capsys.readouterr().out and Image.open(tmp_path / "grid.png").size == (76, 40)


def test_push_takes_a_bundled_name(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "grid.png")
    assert main(["push", "--model", "digits", "--repo-id", "user/digits", "--dry-run", "--grid", str(tmp_path / "grid.png")]) == 0
    assert "| unet/diffusion_pytorch_model.safetensors |" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["{run}/pipeline/onnx", "{run}/pipeline"])
def test_an_export_samples_with_onnxruntime_where_torch_is_missing(tmp_path, model):
    run = tmp_path / "run"
    shutil.copytree(DIGITS_MODEL, run / "pipeline")
    output = tmp_path / "grid.png"
    result = run_without_torch(
        "from ddpm_plugin.cli import main\n"
        f"sys.exit(main(['sample', '--model', {model.format(run=run)!r}, '--num-images', '2', '--steps', '2', "
        f"'--scheduler', 'ddim', '--output', {str(output)!r}]))\n"
    )
    assert result.returncode == 0, result.stderr
    assert "(onnxruntime)" in result.stdout and output.is_file()


def test_info_works_without_torch():
    result = run_without_torch("from ddpm_plugin.cli import main\nsys.exit(main(['info']))\n")
    assert result.returncode == 0, result.stderr
    assert "| digits | 8x8x1 | 701,345 |" in result.stdout and "torch is not installed" in result.stdout


@pytest.mark.parametrize("command", ["sample", "demo", "export", "evaluate"])
def test_help_names_the_default_model_the_code_uses(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bundled mnist model" in text and "digits model" not in text
    assert resolve_model(None) == MNIST_MODEL


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_help_shows_the_seed_default(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "(default: 0)" in " ".join(capsys.readouterr().out.split()).rpartition("--seed SEED")[2][:200]


def test_open_sampler_and_the_web_page_take_a_bundled_name(tmp_path):
    from ddpm_plugin.demo.web.site import main as site_main
    from ddpm_plugin.export.sampler import open_sampler

    sampler = open_sampler("digits", "onnxruntime", "ddim", num_inference_steps=2, progress_bar=False)
    assert sampler.loaded.model == DIGITS_MODEL.resolve()
    assert sampler(0, 1).shape == (1, 8, 8, 1)
    assert site_main(["--model", "digits", "--space", str(tmp_path / "space")]) == 0
    assert (tmp_path / "space" / "index.html").is_file()
