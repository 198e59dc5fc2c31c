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


def test_bits_per_dim_subset_is_drawn_at_random_with_the_seed(tiny_pipeline):
    from ddpm_plugin.evaluation import dataset_images

    a, size = dataset_images("digits", tiny_pipeline, 10, seed=0)
    b, _ = dataset_images("digits", tiny_pipeline, 10, seed=0)
    c, _ = dataset_images("digits", tiny_pipeline, 10, seed=1)
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8 and size == 1797
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
