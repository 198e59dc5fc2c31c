"""The demo's engine and page, in-process on a tiny pipeline (no server, no browser)."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddpm_plugin.demo.backends import (
    NUM_SNAPSHOTS,
    DemoEngine,
    GenerationRequest,
    fit_image,
    gallery_images,
    interpolation_picture,
    progression_picture,
    training_summary,
    unique_names,
)
from ddpm_plugin.bundled import MNIST_MODEL
from ddpm_plugin.export.engine_choice import choose_engine

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine(tiny_pipeline_dir) -> DemoEngine:
    return DemoEngine([tiny_pipeline_dir], max_images=6, num_threads=1, onnx=False)


def request(**overrides) -> GenerationRequest:
    fields = {"model": "pipeline", "backend": "pytorch", "sampler": "ddim", "num_inference_steps": 5,
              "num_images": 3, "seed": 7}
    return GenerationRequest(**{**fields, **overrides})


def test_same_seed_gives_the_same_images_and_another_seed_other_images(engine):
    first = engine.generate(request(seed=7)).images
    again = engine.generate(request(seed=7)).images
    other = engine.generate(request(seed=8)).images
    assert first.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_onnx_backend_samples_the_shipped_export_reproducibly_and_keeps_no_cache(tiny_pipeline_dir, tmp_path,
                                                                                 monkeypatch):
    from ddpm_plugin.export.onnx_export import export_onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    without = DemoEngine([tiny_pipeline_dir], num_threads=1)
    assert without.backends == ["pytorch"]
    (model,) = without.models.values()
    assert "carries no ONNX export" in model.onnx_problem and "ddpm export --model" in model.onnx_problem
    folder = Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "exported" / "pipeline"))  # the name request() picks
    export_onnx(folder, folder / "onnx", seed=0)
    engine = DemoEngine([folder], num_threads=1, concurrency=2)
    # every engine that runs the export, the one `ddpm sample` would choose here first
    assert sorted(engine.backends) == ["onnxruntime", "openvino", "pytorch"]
    assert engine.backends[0] == choose_engine(folder, GenerationRequest.num_images).backend
    first = engine.generate(request(backend="onnxruntime", seed=3)).images
    # the same export on OpenVINO, at the precision `ddpm sample` would choose for it here: reproducible
    precision = choose_engine(folder, GenerationRequest.num_images, backend="openvino").precision
    assert engine.models["pipeline"].export_precisions["openvino"].startswith(precision)
    on_openvino = engine.generate(request(backend="openvino", seed=3)).images
    assert on_openvino.shape == first.shape
    np.testing.assert_array_equal(on_openvino, engine.generate(request(backend="openvino", seed=3)).images)
    again = DemoEngine([folder], num_threads=1)
    np.testing.assert_array_equal(first, again.generate(request(backend="onnxruntime", seed=3)).images)
    assert not (tmp_path / "cache" / "ddpm-plugin").exists()  # no export (onnxruntime keeps a device id there)


def test_ancestral_sampler_honours_the_variance_type(engine):
    large = engine.generate(request(sampler="ddpm", variance_type="fixed_large", num_inference_steps=20)).images
    small = engine.generate(request(sampler="ddpm", variance_type="fixed_small", num_inference_steps=20)).images
    assert not np.allclose(large, small)


def test_progress_is_reported_after_every_step(engine):
    reported = []
    engine.generate(request(num_inference_steps=12), on_step=lambda done, total: reported.append((done, total)))
    assert reported == [(k, 12) for k in range(1, 13)]


def test_progression_keeps_snapshots_from_the_first_to_the_last_step(engine):
    generation = engine.generate(request(sampler="ddpm", num_inference_steps=50, num_images=5))
    assert generation.x_t.shape == generation.pred_original_sample.shape == (NUM_SNAPSHOTS, 5, 8, 8, 1)
    assert generation.timesteps[0] > generation.timesteps[-1] == 0
    # After the last step x_t is the sample itself.
    np.testing.assert_allclose(generation.x_t[-1], generation.images, atol=1e-6)
    picture = progression_picture(generation)
    # Four images, two rows each (x_t, predicted x_0), 8 snapshots, 8x8 tiles upscaled 8x with 1-pixel padding.
    assert picture.size == (8 * 8 * 9 + 8, 8 * 8 * 9 + 8)


def test_few_steps_give_one_snapshot_per_step(engine):
    generation = engine.generate(request(num_inference_steps=2, num_images=1))
    assert len(generation.timesteps) == 2


def test_gallery_images_are_upscaled_with_crisp_pixels(engine):
    images = engine.generate(request(num_images=2)).images
    picture = np.asarray(gallery_images(images)[1])
    assert picture.shape == (128, 128)
    # Nearest neighbour: every 16x16 block is one source pixel.
    np.testing.assert_array_equal(picture[::16, ::16], (images[1, ..., 0] * 255).round().astype(np.uint8))
    assert (picture.reshape(8, 16, 8, 16).std(axis=(1, 3)) == 0).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_inference_steps": 0}, "Steps must be in 1..1000, got 0"),
        ({"num_inference_steps": 2000}, "Steps must be in 1..1000, got 2000"),
        ({"num_inference_steps": 2.5}, "Steps must be a whole number"),
        ({"num_images": 7}, "Number of images must be in 1..6, got 7"),
        ({"num_images": 0}, "Number of images must be in 1..6, got 0"),
        ({"seed": -1}, "Seed must be in 0..2147483647"),
        ({"seed": None}, "Seed must be a whole number"),
        ({"eta": 1.5}, "Eta must be a number in 0..1"),
        ({"sampler": "euler"}, "Sampler must be one of ddpm, ddim"),
        ({"variance_type": "learned"}, "Variance must be one of fixed_large, fixed_small"),
        ({"backend": "tensorflow"}, "Backend must be one of onnxruntime, openvino, pytorch"),
        ({"backend": "onnxruntime"}, "ONNX Runtime is not available for pipeline"),
        ({"model": "/etc"}, "Unknown model '/etc'; choose one of: pipeline"),
        ({"model": "../pipeline"}, "Unknown model"),
        # What an API client may send instead of a number or a choice (issue 11, item 6): refused, never rounded.
        ({"num_inference_steps": float("nan")}, "Steps must be a whole number in 1..1000, got nan"),
        ({"num_inference_steps": float("inf")}, "Steps must be a whole number in 1..1000, got inf"),
        ({"num_inference_steps": "10"}, "Steps must be a whole number in 1..1000, got '10'"),
        ({"num_inference_steps": [10]}, "Steps must be a whole number in 1..1000, got [10]"),
        ({"num_inference_steps": True}, "Steps must be a whole number in 1..1000, got True"),
        ({"num_inference_steps": 10**400}, "Steps must be in 1..1000, got 1000000"),
        ({"num_images": 2.5}, "Number of images must be a whole number in 1..6, got 2.5"),
        ({"num_images": {"n": 2}}, "Number of images must be a whole number"),
        ({"seed": "abc"}, "Seed must be a whole number in 0..2147483647, got 'abc'"),
        ({"seed": float("-inf")}, "Seed must be a whole number"),
        ({"eta": float("nan")}, "Eta must be a number in 0..1, got nan"),
        ({"eta": "0.5"}, "Eta must be a number in 0..1, got '0.5'"),
        ({"eta": [0.1]}, "Eta must be a number in 0..1, got [0.1]"),
        ({"sampler": ["ddim"]}, "Sampler must be one of ddpm, ddim, dpmsolver++; got ['ddim']"),
        ({"backend": None}, "Backend must be one of onnxruntime, openvino, pytorch; got None"),
        ({"model": ["pipeline"]}, "Unknown model ['pipeline']"),
        ({"model": "m" * 5_000_000}, "Unknown model 'mmm"),
    ],
)
def test_rejected_requests_name_the_control(engine, overrides, message):
    with pytest.raises(ValueError) as error:
        engine.generate(request(**overrides))
    assert str(error.value).startswith(message) or message in str(error.value)
    assert len(str(error.value)) < 200  # a long value is never echoed back whole


def test_whole_number_floats_are_accepted_as_ints(engine):
    checked = engine.check(request(num_inference_steps=5.0, num_images=2.0, seed=3.0))
    assert (checked.num_inference_steps, checked.num_images, checked.seed) == (5, 2, 3)
    assert all(isinstance(v, int) for v in (checked.num_inference_steps, checked.num_images, checked.seed))


def test_uploads_are_fitted_to_the_model_by_box_averaging():
    upload = np.zeros((16, 24, 3), dtype=np.uint8)
    upload[:, :12] = 255  # left half white
    fitted = fit_image("Image", upload, (1, 8, 8))
    assert fitted.shape == (8, 8, 1) and fitted.dtype == np.uint8
    assert (fitted[:, :4] == 255).all() and (fitted[:, 4] == 0).all()
    assert fit_image("Image", upload[:8, :8], (3, 8, 8)).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="Image: upload an image first"):
        fit_image("Image", None, (1, 8, 8))


def test_a_gallery_picture_fits_back_to_the_sample_it_shows(engine):
    images = engine.generate(request(num_images=1)).images
    fitted = fit_image("Image", np.asarray(gallery_images(images)[0].convert("RGB")), (1, 8, 8))
    np.testing.assert_array_equal(fitted[..., 0], (images[0, ..., 0] * 255).round().astype(np.uint8))


def test_interpolation_decodes_one_image_per_lambda(engine):
    upload = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    images, output = engine.interpolate("pipeline", upload, upload[::-1], timestep=20, num_lambdas=3, seed=0)
    assert images.shape == (2, 8, 8, 1) and output.images.shape == (3, 8, 8, 1) and output.timestep == 20
    assert interpolation_picture(images, output.images).size == (5 * 64 + 6 * 8, 64 + 16)
    with pytest.raises(ValueError, match="Number of interpolants must be in 2..16, got 17"):
        engine.interpolate("pipeline", upload, upload, timestep=20, num_lambdas=17, seed=0)


def test_bits_per_dim_of_an_upload_is_rate_plus_distortion(engine):
    upload = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    fitted, output = engine.bits_per_dim("pipeline", upload, seed=0)
    np.testing.assert_array_equal(fitted[..., 0], upload)
    np.testing.assert_allclose(output.total_bpd, output.rate_bpd + output.decoder_bpd)


def test_models_are_offered_by_unique_base_name_only():
    assert unique_names([Path("/a/digits"), Path("/b/digits"), Path("/c/mnist")]) == ["digits", "digits-2", "mnist"]


def test_describe_lists_models_backends_and_limits(engine):
    description = engine.describe()
    assert list(description["models"]) == ["pipeline"]
    assert description["backends"] == ["pytorch"]
    assert description["limits"] == {"max_images": 6, "max_steps": 1000, "max_seed": 2**31 - 1, "max_lambdas": 16}
    assert str(engine.models["pipeline"].folder) not in str(description)  # no server paths leak


def test_page_exposes_only_the_named_api(engine, tmp_path):
    from ddpm_plugin.demo.app import build_demo
    from ddpm_plugin.demo.uploads import UploadStore

    demo = build_demo(engine, UploadStore(tmp_path))
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"generate", "interpolate", "bits_per_dim", "models"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--port", "70000"], "argument --port: must be a whole number in 0..65535, got '70000'"),
        (["--port", "-1"], "argument --port: must be a whole number in 0..65535, got '-1'"),
        (["--port", "http"], "argument --port: must be a whole number in 0..65535, got 'http'"),
        (["--max-images", "0"], "argument --max-images: must be a whole number >= 1, got '0'"),
        (["--concurrency", "0"], "argument --concurrency: must be a whole number >= 1, got '0'"),
        (["--queue-size", "-5"], "argument --queue-size: must be a whole number >= 1, got '-5'"),
        (["--threads", "0"], "argument --threads: must be a whole number >= 1, got '0'"),
    ],
)
def test_cli_demo_refuses_out_of_range_numbers_with_one_line(arguments, message):
    result = subprocess.run([sys.executable, "-m", "ddpm_plugin.cli", "demo", *arguments], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"ddpm demo: error: {message}"
    assert "Traceback" not in result.stderr


def test_cli_demo_takes_repeated_models_and_an_address():
    from ddpm_plugin.cli import build_parser

    args = build_parser().parse_args(["demo", "--model", "a", "--model", "b", "--host", "0.0.0.0", "--port", "8000"])
    assert (args.model, args.host, args.port, args.concurrency) == (["a", "b"], "0.0.0.0", 8000, 2)


@pytest.mark.slow
def test_app_runs_as_a_space_script_without_the_cli():
    script = (
        "import runpy, sys\n"
        "sys.argv = ['app.py', *sys.argv[1:]]\n"
        "try:\n    runpy.run_path('app.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code, sorted(m for m in sys.modules if m.startswith('ddpm_plugin.cli')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO / "demo")
    assert result.returncode == 0, result.stderr
    assert "--max-images" in result.stdout and result.stdout.strip().endswith("exit 0 []")
    refused = subprocess.run([sys.executable, "-c", script, "--port", "70000"], capture_output=True, text=True,
                             timeout=120, cwd=REPO / "demo")
    assert "app.py: error: argument --port: must be a whole number in 0..65535, got '70000'" in refused.stderr
    assert refused.stdout.strip() == "exit 2 []"


def test_the_demo_imports_no_cli_module_and_ships_no_test_helpers():
    """The dependencies run cli -> demo: no module of the demo imports `ddpm_plugin.cli` (at the top or inside a
    function), and the browser test helpers live under tests/, outside the wheel."""
    for path in (REPO / "demo").rglob("*.py"):
        if "node_modules" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.startswith("ddpm_plugin.cli") for name in names), (path, names)
    assert importlib.util.find_spec("ddpm_plugin.demo.web.testing") is None
    assert not (REPO / "demo" / "web" / "testing.py").exists()


def test_the_page_says_what_a_model_was_trained_on_for_how_long_and_what_was_measured(tmp_path, tiny_pipeline_dir):
    summary = training_summary(MNIST_MODEL)
    assert summary.startswith("Trained on MNIST for ") and " steps (" in summary and "hours on one CPU thread" in summary
    assert "Measured: " in summary and "bits/dim" in summary
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "training_config.json").write_text('{"dataset": "digits"}')
    (folder / "training_run.json").write_text('{"step": 1200, "images_seen": 76800}')
    assert training_summary(folder) == "Trained on scikit-learn's 8x8 digits for 1,200 steps (76,800 images)."
    (folder / "training_run.json").write_text("{not json")
    assert training_summary(folder) == ""  # a broken file hides the line, never the page
    assert training_summary(tiny_pipeline_dir) == ""  # a folder that does not say


def page_components(engine: DemoEngine, tmp_path: Path) -> dict[str, dict]:
    """The page's components by `elem_id`, as the browser receives them."""
    from ddpm_plugin.demo.app import build_demo
    from ddpm_plugin.demo.uploads import UploadStore

    config = build_demo(engine, UploadStore(tmp_path)).get_config_file()
    return {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}


def test_the_interpolation_starts_at_the_t_measured_for_each_model_and_says_why(tiny_pipeline_dir, tmp_path):
    """The default t is read from the measured table (by the weights' SHA-256), never written in code; a model
    that was not measured starts at the table's fallback, and the hint says which."""
    from ddpm_plugin.demo.backends import INTERPOLATION_DEFAULTS

    table = json.loads(INTERPOLATION_DEFAULTS.read_text())
    measured = next(entry for entry in table.values() if entry.get("model") == MNIST_MODEL.name)
    engine = DemoEngine([MNIST_MODEL, tiny_pipeline_dir], num_threads=1, onnx=False)
    mnist, tiny = engine.models[MNIST_MODEL.name], engine.models["pipeline"]
    assert mnist.interpolation_t == measured["timestep"] < 500  # t = 500 lost the endpoints' class on MNIST
    assert f"keep their class up to t = {measured['timestep']}" in mnist.interpolation_hint
    assert tiny.interpolation_t == table["fallback"]["timestep"] and "not measured" in tiny.interpolation_hint
    components = page_components(engine, tmp_path)
    assert components["interpolation-t"]["value"] == measured["timestep"]
    assert mnist.interpolation_hint in components["interpolation-hint"]["value"]
    assert engine.describe()["models"][MNIST_MODEL.name]["interpolation_t"] == measured["timestep"]


def test_the_page_explains_itself_in_plain_words_and_keeps_the_papers_terms(engine, tmp_path):
    components = page_components(engine, tmp_path)
    intro = components["intro"]["value"]
    assert "turns random noise into pictures" in intro and "Algorithm 2" in intro  # plain words, then the paper's
    for elem_id in ("model", "backend", "sampler", "variance", "steps", "num-images", "seed", "interpolation-t",
                    "num-lambdas", "interpolation-seed", "bpd-seed"):
        assert len(components[elem_id].get("info") or "") > 20, elem_id  # every control says what it does
