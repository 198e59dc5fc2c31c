"""`ddpm sample --output-dir`: shards that do not depend on the process count, survive a kill, and refuse mix-ups."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddpm_plugin.cli import main
from ddpm_plugin.export.sampler import open_sampler
from ddpm_plugin.sample_shards import MANIFEST, iter_sample_batches, load_shard, sample_to_shards

# One thread per process in every run: the same kernels, so the same floating-point sums.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def onnx_pipeline_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline with its export in `onnx/`, as `ddpm export` leaves a model folder."""
    import shutil

    from ddpm_plugin.export.onnx_export import export_onnx

    folder = Path(shutil.copytree(tiny_pipeline_dir, tmp_path_factory.mktemp("with_onnx") / "pipeline"))
    export_onnx(folder, folder / "onnx", seed=0)
    return folder


def sample_command(model: Path, output: Path, *extra: str) -> list[str]:
    return ["-m", "ddpm_plugin.cli", "sample", "--model", str(model), "--output-dir", str(output), *extra]


def draw_shards(model: Path, output_dir: Path, num_images: int, batch_size: int = 64, device: str = "cpu",
                **options) -> dict:
    """`sample_to_shards` on the sampler `ddpm sample` opens."""
    return sample_to_shards(open_sampler(model, device=device, progress_bar=False, **options), output_dir, num_images,
                            batch_size)


def all_images(folder: Path) -> np.ndarray:
    return np.concatenate([load_shard(folder / entry["file"]) for entry in json.loads((folder / MANIFEST).read_text())["shards"]])


@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_an_image_depends_only_on_the_seed_and_its_index(onnx_pipeline_dir, backend):
    sampler = open_sampler(onnx_pipeline_dir, backend, "ddpm", num_inference_steps=10, seed=5, progress_bar=False)
    batch = sampler(0, 4)
    alone = sampler(2, 1)[0]
    # Another batch composition may round a float differently, never more than one grey level.
    assert np.abs(batch[2].astype(int) - alone.astype(int)).max() <= 1
    assert (batch[2] == alone).mean() > 0.95
    assert np.array_equal(sampler(0, 4), batch)
    other_seed = open_sampler(onnx_pipeline_dir, backend, "ddpm", num_inference_steps=10, seed=6, progress_bar=False)
    assert np.abs(other_seed(2, 1)[0].astype(int) - alone.astype(int)).mean() > 10
    assert len({batch[k].tobytes() for k in range(4)}) == 4


def test_the_default_backend_is_onnxruntime_when_the_folder_carries_an_export(onnx_pipeline_dir, tiny_pipeline_dir, tmp_path):
    with_export = draw_shards(onnx_pipeline_dir, tmp_path / "a", 3, batch_size=2, num_inference_steps=5, device="cpu")
    without = draw_shards(tiny_pipeline_dir, tmp_path / "b", 3, batch_size=2, num_inference_steps=5, device="cpu")
    assert with_export["run"]["backend"] == "onnxruntime" and without["run"]["backend"] == "pytorch"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_two_gloo_processes_write_bitwise_the_images_of_one(onnx_pipeline_dir, tmp_path, backend, two_process_launch):
    args = ("--num-images", "11", "--batch-size", "2", "--steps", "20", "--seed", "7", "--backend", backend)
    one = subprocess.run([sys.executable, *sample_command(onnx_pipeline_dir, tmp_path / "one", *args)], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*two_process_launch, *sample_command(onnx_pipeline_dir, tmp_path / "two", *args)],
                         env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    manifests = [json.loads((tmp_path / name / MANIFEST).read_text()) for name in ("one", "two")]
    assert [m["num_processes"] for m in manifests] == [1, 2]
    assert {s["process_index"] for s in manifests[0]["shards"]} == {0}
    assert {s["process_index"] for s in manifests[1]["shards"]} == {0, 1}  # both processes wrote shards
    assert manifests[0]["run"] == manifests[1]["run"] and len(manifests[1]["shards"]) == 6
    assert two.stdout.count("images in 6 shards") == 1, "only the main process reports"
    assert np.array_equal(all_images(tmp_path / "one"), all_images(tmp_path / "two"))
    assert all_images(tmp_path / "one").shape == (11, 8, 8, 1)


@pytest.mark.slow
def test_a_run_killed_and_started_again_ends_with_the_uninterrupted_images(tiny_pipeline_dir, tmp_path):
    args = ("--num-images", "16", "--batch-size", "2", "--steps", "30", "--backend", "pytorch", "--seed", "3")
    straight = subprocess.run([sys.executable, *sample_command(tiny_pipeline_dir, tmp_path / "straight", *args)],
                              env=ENV, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, *sample_command(tiny_pipeline_dir, killed, *args)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(24_000):  # up to 4 minutes on a busy machine
        if (killed / "shard-00002.npz").exists():
            break
        assert victim.poll() is None, f"sampling exited early: {victim.stderr.read()[-3000:]}"
        time.sleep(0.01)
    else:
        pytest.fail("no shard was written in 4 minutes")
    time.sleep(random.uniform(0.0, 0.3))  # anywhere in the following shards, possibly mid-write
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not json.loads((killed / MANIFEST).read_text())["complete"], "the run finished before the kill"
    kept = len(list(killed.glob("shard-*.npz")))
    print("shards at the kill:", kept, "temporary files:", [p.name for p in killed.glob(".*")])

    resumed = subprocess.run([sys.executable, *sample_command(tiny_pipeline_dir, killed, *args)], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({kept} kept from an earlier run" in resumed.stdout
    assert np.array_equal(all_images(killed), all_images(tmp_path / "straight"))
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())


def test_a_rerun_redoes_truncated_shards_and_removes_partial_files(tiny_pipeline_dir, tmp_path):
    options = dict(num_images=7, batch_size=2, num_inference_steps=5, seed=1, backend="pytorch", device="cpu")
    first = draw_shards(tiny_pipeline_dir, tmp_path, **options)
    expected = all_images(tmp_path)
    shard = tmp_path / first["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:200])  # cut off, as a copy interrupted half-way leaves it
    (tmp_path / ".shard-00002.npz.abc.partial").write_bytes(b"half a shard")
    second = draw_shards(tiny_pipeline_dir, tmp_path, **options)
    assert second["shards_reused"] == 3 and second["images_drawn"] == 2
    assert np.array_equal(all_images(tmp_path), expected)
    assert not list(tmp_path.glob(".*"))
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]


def test_other_arguments_in_a_sample_folder_are_refused_and_nothing_changes(tiny_pipeline_dir, tmp_path, capsys):
    base = ["sample", "--model", str(tiny_pipeline_dir), "--output-dir", str(tmp_path), "--num-images", "3",
            "--steps", "4", "--backend", "pytorch"]
    assert main(base) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main([*base[:-4], "--steps", "5", "--seed", "9"]) == 2
    error = capsys.readouterr().err
    assert "num_inference_steps 4 (now 5)" in error and "seed 0 (now 9)" in error and "Traceback" not in error
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_folder_with_other_files_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--output-dir", str(tmp_path), "--steps", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_reading_samples_checks_completeness_and_checksums(tiny_pipeline_dir, tmp_path):
    manifest = draw_shards(tiny_pipeline_dir, tmp_path, 5, batch_size=2, num_inference_steps=3, device="cpu")
    batches = list(iter_sample_batches(tmp_path, num_images=3, progress_bar=False))
    assert [len(b) for b in batches] == [2, 1]
    with pytest.raises(ValueError, match="fewer than the 6"):
        next(iter_sample_batches(tmp_path, num_images=6))
    shard = tmp_path / manifest["shards"][2]["file"]
    images = load_shard(shard)
    np.savez(shard, images=255 - images, process_index=np.int64(0))
    with pytest.raises(ValueError, match="SHA-256"):
        list(iter_sample_batches(tmp_path, progress_bar=False))
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="unfinished"):
        next(iter_sample_batches(tmp_path))


def copied_pipeline(source: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, target))


@pytest.mark.parametrize("change, named", [
    (lambda m: m.joinpath("scheduler/scheduler_config.json").write_text(
        json.dumps({**json.loads(m.joinpath("scheduler/scheduler_config.json").read_text()), "beta_end": 0.2})),
     "scheduler/scheduler_config.json"),
    (lambda m: m.joinpath("scheduler/scheduler_config.json").write_text(
        json.dumps({**json.loads(m.joinpath("scheduler/scheduler_config.json").read_text()), "variance_type": "fixed_small"})),
     "variance_type"),
    (lambda m: m.joinpath("model_index.json").write_text(m.joinpath("model_index.json").read_text() + " "), "model_index.json"),
])
def test_a_sample_folder_of_a_changed_pytorch_model_is_refused_naming_the_change(tiny_pipeline_dir, tmp_path, capsys, change, named):
    model = copied_pipeline(tiny_pipeline_dir, tmp_path / "model")
    args = ["sample", "--model", str(model), "--output-dir", str(tmp_path / "out"), "--num-images", "3", "--steps", "4",
            "--batch-size", "2", "--backend", "pytorch"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    change(model)
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err
    assert named in error and "other arguments" in error and "Traceback" not in error
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_sample_folder_of_another_onnx_model_file_is_refused(onnx_pipeline_dir, tmp_path, capsys):
    model = copied_pipeline(onnx_pipeline_dir, tmp_path / "model")
    args = ["sample", "--model", str(model), "--output-dir", str(tmp_path / "out"), "--num-images", "3", "--steps", "4",
            "--batch-size", "2", "--backend", "onnxruntime"]
    assert main(args) == 0
    metadata_path = model / "onnx" / "ddpm_onnx.json"
    (model / "onnx" / "other.onnx").write_bytes((model / "onnx" / "model.onnx").read_bytes())
    metadata_path.write_text(json.dumps({**json.loads(metadata_path.read_text()), "model_file": "other.onnx"}))
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "onnx/ddpm_onnx.json" in error and "other.onnx" in error and "Traceback" not in error


def test_a_run_records_the_schedule_precision_and_every_file_the_sampler_loads(onnx_pipeline_dir, tmp_path):
    torch_run = draw_shards(onnx_pipeline_dir, tmp_path / "a", 2, batch_size=2, num_inference_steps=3,
                                 backend="pytorch", device="cpu")["run"]
    onnx_run = draw_shards(onnx_pipeline_dir, tmp_path / "b", 2, batch_size=2, num_inference_steps=3,
                                backend="onnxruntime", device="cpu")["run"]
    assert {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors"} <= set(torch_run["files"])
    assert {"onnx/ddpm_onnx.json", "onnx/model.onnx", "onnx/scheduler/scheduler_config.json"} <= set(onnx_run["files"])
    for run in (torch_run, onnx_run):
        assert run["schedule"]["num_train_timesteps"] == 1000 and run["schedule"]["variance_type"] == "fixed_large"
        assert len(run["schedule"]["betas_sha256"]) == 64 and run["precision"]


def test_a_foreign_shard_copied_into_a_finished_run_is_not_kept(tiny_pipeline_dir, tmp_path):
    options = dict(num_images=7, batch_size=2, num_inference_steps=4, backend="pytorch", device="cpu")
    first = draw_shards(tiny_pipeline_dir, tmp_path / "seed0", seed=0, **options)
    expected = all_images(tmp_path / "seed0")
    draw_shards(tiny_pipeline_dir, tmp_path / "seed1", seed=1, **options)
    for name in [p.name for p in (tmp_path / "seed1").glob("shard-00002*")]:  # the shard and any record beside it
        (tmp_path / "seed0" / name).write_bytes((tmp_path / "seed1" / name).read_bytes())
    second = draw_shards(tiny_pipeline_dir, tmp_path / "seed0", seed=0, **options)
    assert second["shards_reused"] == 3 and second["images_drawn"] == 2
    assert np.array_equal(all_images(tmp_path / "seed0"), expected)
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]


def test_a_shard_changed_after_writing_is_not_kept_even_when_it_loads(tiny_pipeline_dir, tmp_path):
    options = dict(num_images=4, batch_size=2, num_inference_steps=4, backend="pytorch", device="cpu", seed=0)
    first = draw_shards(tiny_pipeline_dir, tmp_path, **options)
    shard = tmp_path / first["shards"][0]["file"]
    with np.load(shard, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["images"] = 255 - arrays["images"]
    with open(shard, "wb") as file:
        np.savez(file, **arrays)
    second = draw_shards(tiny_pipeline_dir, tmp_path, **options)
    assert second["shards_reused"] == 1
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]


def test_a_link_to_a_device_in_the_model_folder_is_refused_without_hanging(tiny_pipeline_dir, tmp_path):
    model = copied_pipeline(tiny_pipeline_dir, tmp_path / "model")
    (model / "unet" / "extra.safetensors").symlink_to("/dev/zero")
    result = subprocess.run([sys.executable, *sample_command(model, tmp_path / "out", "--num-images", "2", "--steps", "2",
                                                             "--backend", "pytorch")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "extra.safetensors is a link" in result.stderr and "Traceback" not in result.stderr
