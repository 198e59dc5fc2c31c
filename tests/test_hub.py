"""Hub publishing against a loopback Hub (`tests/hub_server.py`) with the real `huggingface_hub` client.

The main push runs `ddpm push` in a subprocess with `HF_ENDPOINT`, `HF_TOKEN` and a fresh `HF_HOME`, and the
published repository is loaded back in another subprocess where `ddpm_plugin` cannot be imported, through the
real download path (`model_info`, tree listing, `resolve`). The error cases run `ddpm push` in-process with
`huggingface_hub`'s import-time settings (endpoint, offline mode, Xet, token path) pointed at the loopback Hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from hub_server import LoopbackHub

# huggingface_hub's LFS upload passes a file object as `data=`, which its HTTP client deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_loopbackTestToken7c1e5a9d3b"
REPO_ID = "tester/tiny-ddpm"
COMMIT_MESSAGE = "Publish the tiny digits DDPM"
REPORT = {"bits_per_dim": 4.125, "fid": 12.5, "inception_score": 2.25, "num_samples": 512, "model": "/home/alice/run"}
DDPM = shutil.which("ddpm") or str(Path(sys.executable).with_name("ddpm"))  # the installed console script
FORBIDDEN = ("checkpoint", "optimizer", "tfevents", ".bin", ".pt", ".pkl", "log", "random_states")


@pytest.fixture(scope="module")
def run_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A `ddpm train` run folder around the tiny pipeline, littered with what must never be published (some of
    it holding the token), with its real ONNX export, an evaluation report and the real training config."""
    from ddpm_plugin.export.onnx_export import export_onnx
    from ddpm_plugin.training import TrainingConfig

    run = tmp_path_factory.mktemp("run")
    pipeline = run / "pipeline"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    shutil.copyfile(pipeline / "unet" / "diffusion_pytorch_model.safetensors",
                    pipeline / "unet" / "diffusion_pytorch_model.non_ema.safetensors")
    config = TrainingConfig(preset="digits", max_steps=1234, output_dir=str(run)).resolve()
    (run / "training_config.json").write_text(json.dumps(asdict(config)))
    (run / "evaluation").mkdir()
    (run / "evaluation" / "report.json").write_text(json.dumps(REPORT))
    litter = {
        run / "checkpoints" / "checkpoint-1000" / "model.safetensors": b"weights",
        run / "checkpoints" / "checkpoint-1000" / "optimizer.bin": b"adam",
        run / "tensorboard" / "events.out.tfevents.1.host": TOKEN.encode(),
        pipeline / "checkpoint-500" / "model.safetensors": b"weights",
        pipeline / "optimizer.pt": b"adam",
        pipeline / "random_states_0.pkl": b"rng",
        pipeline / "unet" / "diffusion_pytorch_model.bin": b"pickle",
        pipeline / "unet" / "optimizer.safetensors": b"adam",
        pipeline / "logs" / "train.log": f"login with {TOKEN}".encode(),
        pipeline / ".env": f"HF_TOKEN={TOKEN}".encode(),
        pipeline / "onnx" / "export.log": TOKEN.encode(),
    }
    export_onnx(pipeline, pipeline / "onnx")  # as `ddpm export --model DIR --output DIR/onnx`
    for path, content in litter.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return run


@pytest.fixture(scope="module")
def grid_png(tmp_path_factory) -> Path:
    from ddpm_plugin.images import make_grid

    path = tmp_path_factory.mktemp("grid") / "grid.png"
    make_grid(np.random.default_rng(0).random((16, 8, 8, 1)), scale=8).save(path)
    return path


def expected_files(run: Path) -> set[str]:
    pipeline = run / "pipeline"
    return {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors", "scheduler/scheduler_config.json",
        "onnx/model.onnx", "onnx/ddpm_onnx.json", "onnx/scheduler/scheduler_config.json",
        "samples.png", "README.md", *(p.name for p in pipeline.glob("*.py")),
    }


def hub_env(hub: LoopbackHub, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def published(run_dir, grid_png, tmp_path_factory):
    """`ddpm push` of the run folder to the loopback Hub, in a subprocess; the Hub stays up for loading back."""
    tmp = tmp_path_factory.mktemp("published")
    with LoopbackHub(tmp / "storage", TOKEN) as hub:
        result = subprocess.run(
            [DDPM, "push", "--model", str(run_dir), "--repo-id", REPO_ID,
             "--commit-message", COMMIT_MESSAGE, "--grid", str(grid_png)],
            env=hub_env(hub, tmp / "home"), capture_output=True, text=True, timeout=120, cwd=tmp,
        )
        yield hub, result, tmp


def test_push_uploads_the_hub_ready_folder_in_one_commit(published, run_dir, grid_png):
    hub, result, _ = published
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f": {hub.endpoint}/{REPO_ID}")
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.summary) == (REPO_ID, "main", COMMIT_MESSAGE)
    assert set(commit.paths) == expected_files(run_dir)
    files = hub.files(REPO_ID)
    pipeline = run_dir / "pipeline"
    for path in expected_files(run_dir) - {"README.md", "samples.png", "onnx/ddpm_onnx.json"}:
        assert files[path] == (pipeline / path).read_bytes(), path
    onnx_metadata = json.loads(files["onnx/ddpm_onnx.json"])
    assert onnx_metadata["source_model"] == ".."  # the repository root, not the exporting machine's path
    assert onnx_metadata["opset"] == json.loads((pipeline / "onnx" / "ddpm_onnx.json").read_text())["opset"]
    assert files["samples.png"] == grid_png.read_bytes()
    # Weights, ONNX and images travel through LFS, as on the Hub.
    assert {"unet/diffusion_pytorch_model.safetensors", "onnx/model.onnx", "samples.png"} <= hub.repos[REPO_ID]["branches"]["main"].lfs


def test_push_publishes_no_checkpoint_log_or_token(published):
    hub, result, tmp = published
    for path in hub.files(REPO_ID):
        assert not any(word in path for word in FORBIDDEN), path
    assert TOKEN.encode() not in hub.uploaded_bytes()
    assert TOKEN not in result.stdout + result.stderr
    stored = [p for p in hub.storage_folder(REPO_ID).rglob("*") if p.is_file()]
    assert stored and all(TOKEN.encode() not in p.read_bytes() for p in stored)


def test_published_card_is_valid_hub_metadata(published, run_dir):
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard import metadata_load

    hub, _, _ = published
    readme = hub.storage_folder(REPO_ID) / "README.md"
    metadata = metadata_load(readme)
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert metadata["license"] == "apache-2.0"
    assert {"ddpm", "diffusers", "onnx", "digits"} <= set(metadata["tags"])
    data = ModelCardData(**metadata)  # strict: raises on a malformed model-index
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {k: REPORT[k] for k in ("bits_per_dim", "fid", "inception_score")}
    card = ModelCard(readme.read_text())
    text = card.text
    assert "![Samples](samples.png)" in text
    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}")' in text
    assert 'custom_pipeline="pipeline_ddpm_paper", trust_remote_code=True' in text
    assert "DDPMPaperPipeline.from_pretrained" in text and "OnnxDDPMPipeline.from_pretrained" in text
    assert "1,234 steps" in text and "scikit-learn's 8x8 digits" in text
    assert "| NLL, variational bound (bits/dim, lower is better) | 4.125 |" in text
    assert "| generated samples (FID, IS) | 512 |" in text
    assert str(run_dir) not in text and "/home/alice" not in text  # no local paths of the trainer's machine


LOAD_BACK = """
import importlib.abc, json, sys

class BlockPlugin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ddpm_plugin" or name.startswith("ddpm_plugin."):
            raise ModuleNotFoundError(f"No module named {name!r}")

blocker = BlockPlugin()
sys.meta_path.insert(0, blocker)
try:
    import ddpm_plugin
    plugin_importable = True
except ModuleNotFoundError:
    plugin_importable = False

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

torch.set_num_threads(1)
repo = sys.argv[1]
stock = DiffusionPipeline.from_pretrained(repo)
try:
    DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_ddpm_paper")
    remote_code_gated = False
except ValueError as error:
    remote_code_gated = "trust_remote_code" in str(error)
paper = DiffusionPipeline.from_pretrained(repo, custom_pipeline="pipeline_ddpm_paper", trust_remote_code=True)
images = {}
for name, pipe in (("stock", stock), ("paper", paper)):
    pipe.set_progress_bar_config(disable=True)
    images[name] = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
loaded = {name: sys.modules.get(name) is not None for name in list(sys.modules) if name.startswith("ddpm_plugin")}
sys.meta_path.remove(blocker)
from ddpm_plugin import DDPMPaperPipeline
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
from huggingface_hub import snapshot_download

plugin = DDPMPaperPipeline.from_pretrained(repo)
onnx = OnnxDDPMPipeline.from_pretrained(snapshot_download(repo, allow_patterns=["onnx/*"]) + "/onnx", provider="cpu")
onnx_images = onnx(batch_size=2, num_inference_steps=3, seed=0, progress_bar=False).images
print(json.dumps({
    "plugin_importable": plugin_importable,
    "plugin_modules_loaded_while_blocked": sorted(loaded),
    "stock_class": type(stock).__name__, "stock_module": type(stock).__module__,
    "paper_class": type(paper).__name__, "paper_module": type(paper).__module__,
    "plugin_class": type(plugin).__name__,
    "onnx_shape": list(onnx_images.shape),
    "remote_code_gated": remote_code_gated,
    "unet_sum": float(sum(p.detach().double().sum() for p in stock.unet.parameters())),
    "same_images": bool((images["stock"] == images["paper"]).all()),
    "card_library": ModelCard.load(repo).data.library_name,
}))
"""


def test_published_repo_loads_with_plain_diffusers_without_the_plugin(published, run_dir):
    from safetensors.numpy import load_file

    hub, _, tmp = published
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_BACK), REPO_ID],
        env=hub_env(hub, tmp / "fresh-home", token=None), capture_output=True, text=True, timeout=180, cwd=tmp,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["plugin_importable"] is False
    assert loaded["plugin_modules_loaded_while_blocked"] == []
    assert (loaded["stock_class"], loaded["stock_module"].split(".")[0]) == ("DDPMPipeline", "diffusers")
    assert loaded["paper_class"] == "DDPMPaperPipeline"
    assert not loaded["paper_module"].startswith("ddpm_plugin")  # diffusers' dynamic module from the repo
    assert loaded["plugin_class"] == "DDPMPaperPipeline"
    assert loaded["onnx_shape"] == [2, 8, 8, 1]
    assert loaded["remote_code_gated"] is True
    assert loaded["same_images"] is True
    assert loaded["card_library"] == "diffusers"
    weights = load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert loaded["unet_sum"] == pytest.approx(sum(float(w.astype(np.float64).sum()) for w in weights.values()), rel=1e-9)
    # Everything was fetched through the Hub's download endpoints.
    assert any(r.path.startswith(f"/{REPO_ID}/resolve/") for r in hub.requests)


# --- In-process: `ddpm push` with huggingface_hub's import-time settings pointed at a loopback Hub. ---


@pytest.fixture
def loopback_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with LoopbackHub(tmp_path / "storage", TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        yield hub


def ddpm_push(*args: str) -> int:
    from ddpm_plugin.cli import main

    return main(["push", *args])


def assert_nothing_published(hub: LoopbackHub, output: str) -> None:
    assert hub.commits == []
    assert hub.endpoint not in output  # no URL reported
    assert not hub.storage.exists() or not any(p.is_file() for p in hub.storage.rglob("*"))
    assert TOKEN not in output


def test_rejected_token_is_a_clear_error_and_publishes_nothing(loopback_hub, run_dir, grid_png, monkeypatch, capfd, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_revokedTokenThatTheHubRejects")
    code = ddpm_push("--model", str(run_dir), "--repo-id", REPO_ID, "--grid", str(grid_png))
    out, err = capfd.readouterr()
    assert code != 0
    assert "rejected the token (401" in err
    assert_nothing_published(loopback_hub, out + err + caplog.text)
    assert "hf_revokedTokenThatTheHubRejects" not in out + err + caplog.text


def test_missing_token_is_a_clear_error(loopback_hub, run_dir, grid_png, capfd):
    code = ddpm_push("--model", str(run_dir), "--repo-id", REPO_ID, "--grid", str(grid_png))
    out, err = capfd.readouterr()
    assert code != 0
    assert "no Hugging Face token found" in err and "HF_TOKEN" in err
    assert loopback_hub.requests == []


def test_server_failure_mid_upload_reports_nothing_published(loopback_hub, run_dir, grid_png, monkeypatch, capfd, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    loopback_hub.fail_commit_with = 500
    code = ddpm_push("--model", str(run_dir), "--repo-id", REPO_ID, "--grid", str(grid_png))
    out, err = capfd.readouterr()
    assert code != 0
    assert "did not confirm the commit" in err and "nothing was published" in err
    assert loopback_hub.lfs_objects  # the weights had been uploaded when the commit failed
    assert_nothing_published(loopback_hub, out + err + caplog.text)


def test_push_to_a_branch_of_a_private_repo_with_the_cached_login(loopback_hub, run_dir, grid_png, capfd):
    from huggingface_hub import constants

    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    code = ddpm_push("--model", str(run_dir / "pipeline"), "--repo-id", REPO_ID, "--grid", str(grid_png),
                     "--private", "--revision", "dev")
    out, err = capfd.readouterr()
    assert code == 0, err
    assert out.strip().endswith(f": {loopback_hub.endpoint}/{REPO_ID}/tree/dev")
    assert loopback_hub.repos[REPO_ID]["private"] is True
    assert [c.revision for c in loopback_hub.commits] == ["dev"]
    assert loopback_hub.files(REPO_ID, "main") == {}
    assert set(loopback_hub.files(REPO_ID, "dev")) == expected_files(run_dir)
    assert "Upload DDPM pipeline (ddpm-plugin" in loopback_hub.commits[0].summary
    assert TOKEN not in out + err


def test_republishing_deletes_files_the_new_push_no_longer_has(loopback_hub, run_dir, tiny_pipeline_dir, grid_png, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert ddpm_push("--model", str(run_dir), "--repo-id", REPO_ID, "--grid", str(grid_png)) == 0
    loopback_hub.repos[REPO_ID]["branches"]["main"].files["LICENSE"] = b"MIT"  # added on the Hub by hand
    assert ddpm_push("--model", str(tiny_pipeline_dir), "--repo-id", REPO_ID, "--grid", str(grid_png)) == 0
    out, err = capfd.readouterr()
    onnx = {"onnx/model.onnx", "onnx/ddpm_onnx.json", "onnx/scheduler/scheduler_config.json"}
    non_ema = "unet/diffusion_pytorch_model.non_ema.safetensors"
    assert len(loopback_hub.commits) == 2 and set(loopback_hub.commits[1].deleted) == onnx | {non_ema}
    assert set(loopback_hub.files(REPO_ID)) == expected_files(run_dir) - onnx - {non_ema} | {"LICENSE"}
    assert "deleted 4 files of an earlier push" in out


def test_dry_run_lists_files_with_sizes_and_sends_nothing(loopback_hub, run_dir, grid_png, capfd):
    code = ddpm_push("--model", str(run_dir), "--repo-id", REPO_ID, "--grid", str(grid_png), "--dry-run")
    out, _ = capfd.readouterr()
    assert code == 0
    assert loopback_hub.requests == []
    listed = dict(line.strip("|").split("|")[:2] for line in out.splitlines() if line.startswith("| ") and "---" not in line)
    listed = {path.strip(): int(size.strip().replace(",", "")) for path, size in listed.items() if path.strip() not in ("file", "total")}
    assert set(listed) == expected_files(run_dir)
    weights = run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    assert listed["unet/diffusion_pytorch_model.safetensors"] == weights.stat().st_size


# --- The Hub-ready folder and the card, without any server. ---


def test_hub_folder_samples_its_own_grid(tiny_pipeline_dir, tmp_path):
    from PIL import Image

    from ddpm_plugin.export.sampler import open_sampler
    from ddpm_plugin.hub import build_hub_folder

    sampler = open_sampler(tiny_pipeline_dir, num_inference_steps=2, progress_bar=False)
    files = build_hub_folder(tiny_pipeline_dir, tmp_path / "repo", REPO_ID, sampler=sampler)
    assert "samples.png" in files and "onnx/model.onnx" not in files
    with Image.open(tmp_path / "repo" / "samples.png") as grid:
        assert grid.size == ((4 * 9 + 1) * 8, (4 * 9 + 1) * 8)  # 4x4 tiles of 8 px, 1 px padding, upscaled 8x
    text = (tmp_path / "repo" / "README.md").read_text()
    assert "16 samples, seed 0, 2 ancestral sampling steps" in text
    assert "No evaluation report was supplied" in text and "No training configuration" in text
    assert "onnxruntime" not in text.lower() and "datasets:" not in text


def test_push_samples_the_grid_with_the_onnx_export_when_the_model_has_one(loopback_hub, run_dir, tmp_path, capfd):
    from PIL import Image

    capfd.readouterr()
    assert ddpm_push("--model", str(run_dir), "--repo-id", REPO_ID, "--grid-steps", "3", "--dry-run",
                     "--output", str(tmp_path / "repo")) == 0
    err = capfd.readouterr().err
    assert "sampling the card's grid with 3 steps on onnxruntime" in err
    assert "0/3 [" in err  # a progress bar over the steps
    assert "16 samples, seed 0, 3 ancestral sampling steps (Algorithm 2), on ONNX Runtime." in (
        tmp_path / "repo" / "README.md").read_text()
    with Image.open(tmp_path / "repo" / "samples.png") as grid:
        assert grid.size == ((4 * 9 + 1) * 8, (4 * 9 + 1) * 8)


def test_hub_finds_a_run_folders_pipeline_through_the_resolver(run_dir):
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.hub import find_pipeline_folder

    assert find_pipeline_folder(run_dir) == resolve_model(run_dir) == run_dir / "pipeline"
    with pytest.raises(FileNotFoundError, match="is not a pipeline folder"):
        find_pipeline_folder(run_dir / "pipeline" / "unet")


def test_card_names_hub_datasets_and_hides_local_paths(tiny_pipeline_dir):
    from ddpm_plugin.model_card import model_card

    cifar = model_card(tiny_pipeline_dir, REPO_ID, training_config={"preset": "cifar10", "dataset": "cifar10"})
    assert cifar.data.datasets == ["uoft-cs/cifar10"]
    local = model_card(tiny_pipeline_dir, REPO_ID, training_config={"preset": "digits", "dataset": "/home/alice/scans/my-digits"})
    assert "/home/alice" not in str(local) and "my-digits" in str(local)
    assert local.data.datasets is None


def test_folder_saved_without_its_code_gets_the_installed_pipeline_code(tiny_pipeline_dir, tmp_path, grid_png):
    from ddpm_plugin.hub import build_hub_folder

    weights_only = tmp_path / "weights-only"  # like the bundled model: configs and weights, no .py files
    shutil.copytree(tiny_pipeline_dir, weights_only, ignore=shutil.ignore_patterns("*.py"))
    files = build_hub_folder(weights_only, tmp_path / "repo", REPO_ID, grid=grid_png)
    saved_code = sorted(p.name for p in tiny_pipeline_dir.glob("*.py"))
    assert sorted(f for f in files if f.endswith(".py")) == saved_code
    for name in saved_code:
        assert (tmp_path / "repo" / name).read_bytes() == (tiny_pipeline_dir / name).read_bytes()


def test_pickled_weights_are_never_published(tiny_pipeline_dir, tmp_path):
    from ddpm_plugin.hub import build_hub_folder

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled weights"):
        build_hub_folder(pickled, tmp_path / "repo", REPO_ID)


# --- What a hostile pipeline folder cannot make `ddpm push` publish (issue 11, items 1-3). ---

SECRET = b"root:x:0:0:a secret of the pushing machine\n"


@pytest.fixture
def hostile_pipeline(run_dir, tmp_path) -> tuple[Path, Path]:
    """A copy of the run's pipeline folder (with its ONNX export) and a secret file outside it."""
    pipeline = tmp_path / "hostile" / "pipeline"
    shutil.copytree(run_dir / "pipeline", pipeline, symlinks=True)
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    return pipeline, secret


@pytest.mark.parametrize("link", ["unet/leaked.safetensors", "onnx/model.onnx.data", "gaussian_diffusion.py",
                                  "unet/config.json", "scheduler"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_push_refuses_a_symlink_out_of_the_folder_and_names_it(loopback_hub, hostile_pipeline, grid_png, link,
                                                                 dry_run, monkeypatch, capfd):
    pipeline, secret = hostile_pipeline
    target = secret
    if link == "scheduler":  # a whole component folder, linked to one outside the pipeline
        target = shutil.move(pipeline / "scheduler", secret.parent / "scheduler")
    (pipeline / link).unlink(missing_ok=True)
    (pipeline / link).symlink_to(target)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = ddpm_push("--model", str(pipeline), "--repo-id", REPO_ID, "--grid", str(grid_png),
                     *(["--dry-run"] if dry_run else []))
    out, err = capfd.readouterr()
    assert code == 2 and "Traceback" not in err
    assert f"{pipeline / link} is a symbolic link" in err and "out of the pipeline folder" in err
    assert SECRET.decode() not in out + err
    assert loopback_hub.commits == [] and SECRET not in loopback_hub.uploaded_bytes()


def test_push_publishes_only_the_pipeline_code_and_lists_what_it_skips(loopback_hub, hostile_pipeline, grid_png,
                                                                          monkeypatch, capfd):
    pipeline, secret = hostile_pipeline
    (pipeline / "local_settings.py").write_text(f'HF_TOKEN = "{TOKEN}"\n')
    (pipeline / "leak.py").symlink_to(secret)  # not imported by the pipeline: skipped, never read
    (pipeline / "notes").mkdir()
    (pipeline / "notes" / "todo.py").write_text("import os\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = ddpm_push("--model", str(pipeline), "--repo-id", REPO_ID, "--grid", str(grid_png))
    out, err = capfd.readouterr()
    assert code == 0, err
    published = set(loopback_hub.files(REPO_ID))
    code_files = {p for p in published if p.endswith(".py")}
    assert code_files == {"pipeline_ddpm_paper.py", "pipeline_outputs.py", "gaussian_diffusion.py", "diffusion_ops.py",
                          "variational_bound.py"}
    for name in code_files:
        assert loopback_hub.files(REPO_ID)[name] == (pipeline / name).read_bytes()
    assert TOKEN.encode() not in loopback_hub.uploaded_bytes() and SECRET not in loopback_hub.uploaded_bytes()
    skipped = next(line for line in out.splitlines() if line.startswith("skipped"))
    for name in ("local_settings.py", "leak.py", "notes/", "optimizer.pt", "logs/", ".env", "onnx/export.log",
                 "unet/diffusion_pytorch_model.bin"):
        assert name in skipped, name
    assert TOKEN not in out + err


def test_push_redacts_the_token_when_the_server_echoes_it(loopback_hub, run_dir, grid_png, monkeypatch, capfd, caplog):
    from hub_server import ECHOED_TOKEN

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    loopback_hub.fail_commit_with, loopback_hub.echo_authorization = 502, True
    code = ddpm_push("--model", str(run_dir), "--repo-id", REPO_ID, "--grid", str(grid_png))
    out, err = capfd.readouterr()
    assert code == 2
    assert "did not confirm the commit" in err and "Bearer hf_[redacted]" in err  # the echo is shown, redacted
    for text in (TOKEN, ECHOED_TOKEN, TOKEN[3:]):
        assert text not in out + err + caplog.text


def test_redaction_covers_log_lines_of_the_hub_client(caplog):
    import logging

    from ddpm_plugin.hub import redact, redacted_logs

    assert redact(f"token {TOKEN} and hf_abcdefghijklmnopqrstuvwxyz01 end", TOKEN) == (
        "token hf_[redacted] and hf_[redacted] end")
    assert redact("the hf_transfer package", TOKEN) == "the hf_transfer package"  # too short to be a token
    with caplog.at_level(logging.DEBUG), redacted_logs(TOKEN):
        logging.getLogger("huggingface_hub.utils._http").warning("sent Authorization: Bearer %s", TOKEN)
        logging.getLogger("httpx").info("header %s", TOKEN)
    logging.getLogger("huggingface_hub").warning("after the push %s", "hf_outsideThePushWindow0123")
    assert TOKEN not in caplog.text and caplog.text.count("hf_[redacted]") == 2
    assert "hf_outsideThePushWindow0123" in caplog.text  # the filter is removed after the push


# --- `ddpm push` checks its arguments before any work (issue 12, item 11). ---


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "{tmp}/missing"], "--model {tmp}/missing: no such folder"),
        (["--grid", "{tmp}/notes.txt"], "argument --grid: {tmp}/notes.txt is not a PNG image (not a picture)"),
        (["--grid", "{tmp}"], "argument --grid: {tmp} is not a PNG image (a folder)"),
        (["--output", "{tmp}"], "is not empty"),
        (["--report", "{tmp}/missing.json"], "argument --report: evaluation report {tmp}/missing.json does not exist"),
        (["--report", "{tmp}/notes.txt"], "argument --report: {tmp}/notes.txt is not valid JSON"),
        (["--repo-id", "no-slash"], "must be 'user/name'"),
        (["--grid-steps", "0"], "argument --grid-steps: must be a whole number >= 1, got '0'"),
    ],
)
def test_push_checks_its_arguments_before_sampling(loopback_hub, run_dir, tmp_path, arguments, message, capfd):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    defaults = {"--model": str(run_dir), "--repo-id": REPO_ID, "--dry-run": None}
    for flag, value in defaults.items():
        if flag not in arguments:
            arguments += [flag] if value is None else [flag, value]
    try:
        code = ddpm_push(*arguments)
    except SystemExit as refused:  # argparse refuses a bad value while parsing
        code = refused.code
    out, err = capfd.readouterr()
    assert code == 2
    assert message.format(tmp=tmp_path) in err
    assert "sampling the card's grid" not in err and "Traceback" not in err and "[Errno" not in err
    assert loopback_hub.requests == [] and not (tmp_path / "samples.png").exists()


def test_an_int8_exports_float32_graph_is_published_with_it(tiny_pipeline_dir, tmp_path):
    """`OnnxDDPMPipeline` needs `model.float32.onnx` of an int8 export (time-step-aware precision): it is uploaded."""
    import shutil

    from ddpm_plugin.hub import pipeline_files

    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "pipeline")
    (folder / "onnx" / "scheduler").mkdir(parents=True)
    for name in ("model.onnx", "model.float32.onnx", "ddpm_onnx.json", "scheduler/scheduler_config.json"):
        (folder / "onnx" / name).write_bytes(b"{}")
    assert {"onnx/model.onnx", "onnx/model.float32.onnx"} <= set(pipeline_files(folder))
