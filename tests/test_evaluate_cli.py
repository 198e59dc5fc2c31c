"""`ddpm evaluate` and `ddpm_plugin.evaluation.evaluate`: the JSON report and the PNG figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation_fixtures import InceptionLike, one_thread  # noqa: F401 (one_thread: autouse fixture)
from ddpm_plugin.cli import main
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
    assert report["num_images"] == 3 and report["dataset_size"] == 1797 and report["dims_per_image"] == 64
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
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8 and size == 1797
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
