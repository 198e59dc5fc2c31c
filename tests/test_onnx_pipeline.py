"""`OnnxDDPMPipeline`: torch-free use, parity with `DDPMPaperPipeline`, samplers, providers and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ddpm_plugin.bundled import DIGITS_MODEL
from ddpm_plugin.export.onnx_pipeline import (
    OnnxDDPMPipeline,
    OnnxModelError,
    inference_timesteps,
    respace,
)
from ddpm_plugin.export.providers import CPU, CUDA, check_cuda, resolve_providers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def onnx_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    from ddpm_plugin.export.onnx_export import export_onnx

    return export_onnx(tiny_pipeline_dir, tmp_path_factory.mktemp("onnx") / "onnx", seed=0).output_dir


@pytest.fixture(scope="module")
def onnx_pipeline(onnx_dir) -> OnnxDDPMPipeline:
    return OnnxDDPMPipeline.from_pretrained(onnx_dir, provider="cpu", num_threads=1)


@pytest.fixture(scope="module")
def digits_pipelines(tiny_pipeline_dir, onnx_dir):
    """The bundled digits model (trained) when it is present, else the tiny random one: (torch, onnx)."""
    import torch

    from ddpm_plugin import DDPMPaperPipeline

    torch.set_num_threads(1)
    folder, export = tiny_pipeline_dir, onnx_dir
    if (DIGITS_MODEL / "onnx" / "ddpm_onnx.json").is_file():
        folder, export = DIGITS_MODEL, DIGITS_MODEL / "onnx"
    pipe = DDPMPaperPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, OnnxDDPMPipeline.from_pretrained(export, provider="cpu", num_threads=1)


class ReplayedTorchNoise:
    """Draws N(0, I) exactly as diffusers' schedulers do from a seeded CPU `torch.Generator`, so that both
    pipelines get the same per-step noise."""

    def __init__(self, seed: int):
        import torch

        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape, dtype=np.float32):
        import torch

        return torch.randn(tuple(shape), generator=self.generator).numpy().astype(dtype)


def max_abs_difference(digits_pipelines, num_inference_steps, scheduler="ddpm", eta=0.0, variance_type=None):
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

    torch_pipe, onnx_pipe = digits_pipelines
    config = torch_pipe.scheduler.config
    if scheduler == "ddim":
        torch_pipe.scheduler = DDIMScheduler.from_config(config)
    else:
        torch_pipe.scheduler = DDPMScheduler.from_config(config, **({"variance_type": variance_type} if variance_type else {}))
    latents = torch.randn(onnx_pipe.image_shape, generator=torch.Generator().manual_seed(1))[None].repeat(2, 1, 1, 1)
    latents[1] = -latents[1]
    try:
        expected = torch_pipe(
            batch_size=2, generator=torch.Generator().manual_seed(7), latents=latents, eta=eta,
            num_inference_steps=num_inference_steps, output_type="np",
        ).images
    finally:
        torch_pipe.scheduler = DDPMScheduler.from_config(config)
    actual = onnx_pipe(
        batch_size=2, generator=ReplayedTorchNoise(7), latents=latents.numpy(), scheduler=scheduler, eta=eta,
        variance_type=variance_type, num_inference_steps=num_inference_steps, progress_bar=False,
    ).images
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max())


# --- Torch-free use. ---


def test_import_and_sampling_work_where_torch_cannot_be_imported(onnx_dir):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        sys.modules["diffusers"] = None
        from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
        pipe = OnnxDDPMPipeline.from_pretrained({str(onnx_dir)!r}, num_threads=1)
        images = pipe(batch_size=2, num_inference_steps=5, seed=0, output_type="pil", progress_bar=False).images
        assert [image.size for image in images] == [(8, 8), (8, 8)], images
        try:
            import torch
        except ImportError:
            print("torch blocked")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch blocked" in result.stdout


# --- Parity with DDPMPaperPipeline (diffusers' schedulers). ---


@pytest.mark.slow
def test_1000_step_ddpm_matches_the_pytorch_pipeline(digits_pipelines):
    # Measured: 1.3e-05 on the bundled digits model, 1.8e-05 on the tiny random one (float64 NumPy step vs
    # diffusers' float32 step).
    assert max_abs_difference(digits_pipelines, 1000) < 1e-4


@pytest.mark.parametrize(("num_inference_steps", "variance_type"), [(50, "fixed_large"), (7, "fixed_small")])
def test_fewer_step_ddpm_matches_ddpm_scheduler(digits_pipelines, num_inference_steps, variance_type):
    assert max_abs_difference(digits_pipelines, num_inference_steps, variance_type=variance_type) < 1e-4


@pytest.mark.parametrize(("num_inference_steps", "eta"), [(10, 0.0), (20, 0.8)])
def test_ddim_matches_ddim_scheduler(digits_pipelines, num_inference_steps, eta):
    assert max_abs_difference(digits_pipelines, num_inference_steps, scheduler="ddim", eta=eta) < 1e-3


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_inference_steps", [1, 7, 50, 333, 1000])
def test_inference_timesteps_match_diffusers(spacing, num_inference_steps):
    from diffusers import DDIMScheduler, DDPMScheduler

    config = {"num_train_timesteps": 1000, "timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0}
    for scheduler_class in (DDPMScheduler, DDIMScheduler):
        scheduler = scheduler_class(**config)
        scheduler.set_timesteps(num_inference_steps)
        np.testing.assert_array_equal(inference_timesteps(config, num_inference_steps), scheduler.timesteps.numpy())


def test_respacing_keeps_the_full_schedule_and_the_kept_alpha_bars(onnx_pipeline):
    diffusion = onnx_pipeline.diffusion
    assert respace(diffusion, np.arange(1000)[::-1]) is diffusion
    timesteps = inference_timesteps(onnx_pipeline.scheduler_config, 50)
    respaced = respace(diffusion, timesteps)
    np.testing.assert_allclose(respaced.alphas_cumprod, diffusion.alphas_cumprod[timesteps[::-1]], rtol=1e-12)


# --- Sampling options. ---


def test_seed_makes_sampling_reproducible_and_batches_differ(onnx_pipeline):
    first = onnx_pipeline(batch_size=3, num_inference_steps=10, seed=3, progress_bar=False).images
    again = onnx_pipeline(batch_size=3, num_inference_steps=10, generator=np.random.default_rng(3), progress_bar=False).images
    other = onnx_pipeline(batch_size=3, num_inference_steps=10, seed=4, progress_bar=False).images
    assert first.shape == (3, 8, 8, 1) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[0], first[1])


def test_callback_sees_every_step_and_progressive_generation_keeps_snapshots(onnx_pipeline):
    calls = []
    onnx_pipeline(batch_size=2, num_inference_steps=20, seed=0, progress_bar=False,
                  callback=lambda i, t, x, x0: calls.append((i, t, x.shape, x0.shape, np.abs(x0).max())))
    assert [c[0] for c in calls] == list(range(20))
    assert [c[1] for c in calls] == inference_timesteps(onnx_pipeline.scheduler_config, 20).tolist()
    assert all(c[2] == c[3] == (2, 1, 8, 8) and c[4] <= 1.0 for c in calls)

    progression = onnx_pipeline.progressive_generation(batch_size=2, num_inference_steps=20, every=5, seed=0, progress_bar=False)
    assert progression.x_t.shape == progression.pred_original_sample.shape == (4, 2, 8, 8, 1)
    assert progression.timesteps == [int(t) for t in inference_timesteps(onnx_pipeline.scheduler_config, 20)[4::5]]
    np.testing.assert_array_equal(progression.x_t[-1], progression.images)


def test_bound_buffers_are_reused_and_hold_the_session_output(onnx_pipeline):
    unet = onnx_pipeline.bound_unet(2)
    assert onnx_pipeline.bound_unet(2) is unet
    unet.sample[:] = np.random.default_rng(0).standard_normal(unet.sample.shape)
    noise_pred = unet(500)
    assert noise_pred is unet.noise_pred  # ORT wrote into the bound NumPy buffer
    (expected,) = onnx_pipeline.session.run(None, {"sample": unet.sample, "timestep": np.full(2, 500, np.int64)})
    np.testing.assert_array_equal(noise_pred, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"scheduler": "euler"}, "scheduler"),
        ({"eta": -1.0}, "eta"),
        ({"variance_type": "learned"}, "variance_type"),
        ({"latents": np.zeros((1, 1, 4, 4), np.float32)}, "latents"),
        ({"output_type": "pt"}, "output_type"),
    ],
)
def test_bad_sampling_arguments_are_named(onnx_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        onnx_pipeline(**{"num_inference_steps": 2, **kwargs})


# --- Providers. ---

_SESSION_STDERR = """
import os, sys, tempfile
import onnxruntime as ort
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
capture = tempfile.TemporaryFile()
os.dup2(capture.fileno(), 2)  # everything written to fd 2, by Python or by onnxruntime's C++ logger
{create}
os.fsync(2)
capture.seek(0)
sys.stdout.write(capture.read().decode(errors="replace"))
"""


def _stderr_of(create: str) -> str:
    code = _SESSION_STDERR.format(create=create)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(check_cuda().usable, reason="a usable CUDA runtime is present")
def test_auto_provider_runs_quietly_on_cpu_where_cuda_is_unusable(onnx_dir):
    assert resolve_providers("auto") == [CPU]
    stderr = _stderr_of(f"print(OnnxDDPMPipeline.from_pretrained({str(onnx_dir)!r}).providers, file=sys.stderr)")
    assert stderr.strip() == "['CPUExecutionProvider']"
    if CUDA in ort.get_available_providers():  # onnxruntime-gpu: asking it directly for CUDA is what logs errors
        noisy = _stderr_of(
            f"ort.InferenceSession({str(onnx_dir / 'model.onnx')!r}, providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])"
        )
        assert "CUDA" in noisy


def test_explicit_provider_lists_are_accepted_and_unknown_ones_rejected(onnx_dir):
    pipe = OnnxDDPMPipeline.from_pretrained(onnx_dir, provider=["CPUExecutionProvider"], num_threads=1)
    assert pipe.providers == [CPU]
    assert resolve_providers([("CPUExecutionProvider", {})]) == [("CPUExecutionProvider", {})]
    with pytest.raises(ValueError, match="not available"):
        OnnxDDPMPipeline.from_pretrained(onnx_dir, provider=["NoSuchExecutionProvider"])
    if not check_cuda().usable:
        with pytest.raises(ValueError, match="CUDA is not usable"):
            OnnxDDPMPipeline.from_pretrained(onnx_dir, provider="cuda")


def test_num_threads_sets_intra_op_threads(onnx_dir):
    from ddpm_plugin.export.providers import physical_cpu_count, session_options

    assert session_options(3).intra_op_num_threads == 3
    assert 1 <= session_options().intra_op_num_threads == physical_cpu_count() <= (os.cpu_count() or 1)


# --- Bad input. ---


@pytest.fixture
def export_copy(onnx_dir, tmp_path) -> Path:
    return Path(shutil.copytree(onnx_dir, tmp_path / "onnx"))


def test_a_pipeline_folder_with_an_onnx_subfolder_loads(export_copy):
    assert OnnxDDPMPipeline.from_pretrained(export_copy.parent, provider="cpu").image_shape == (1, 8, 8)


def test_a_folder_without_an_export_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="ddpm export"):
        OnnxDDPMPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxDDPMPipeline.from_pretrained(tmp_path / "missing")


def test_a_missing_model_file_is_reported(export_copy):
    (export_copy / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="model.onnx is missing"):
        OnnxDDPMPipeline.from_pretrained(export_copy, provider="cpu")


def test_a_truncated_model_file_is_reported_with_context(export_copy):
    model = export_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(OnnxModelError, match="truncated or corrupt") as error:
        OnnxDDPMPipeline.from_pretrained(export_copy, provider="cpu")
    assert str(model) in str(error.value)


def test_a_model_that_does_not_fit_the_metadata_is_reported(export_copy):
    metadata = json.loads((export_copy / "ddpm_onnx.json").read_text())
    (export_copy / "ddpm_onnx.json").write_text(json.dumps({**metadata, "sample_size": 32, "in_channels": 3}))
    with pytest.raises(OnnxModelError, match=r"do not belong together"):
        OnnxDDPMPipeline.from_pretrained(export_copy, provider="cpu")


def test_an_opset_newer_than_the_runtime_is_reported(export_copy):
    import onnx

    model = onnx.load(str(export_copy / "model.onnx"))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99
    onnx.save(model, str(export_copy / "model.onnx"))
    with pytest.raises(OnnxModelError, match="opset is not supported by this onnxruntime"):
        OnnxDDPMPipeline.from_pretrained(export_copy, provider="cpu")


# --- The bundled digits model's export. ---


@pytest.mark.skipif(not (DIGITS_MODEL / "onnx" / "ddpm_onnx.json").is_file(), reason="no bundled ONNX export")
def test_bundled_onnx_export_matches_the_bundled_weights():
    import torch
    from diffusers import UNet2DModel

    pipe = OnnxDDPMPipeline.from_pretrained(DIGITS_MODEL, provider="cpu", num_threads=1)  # finds onnx/
    assert pipe.metadata["preset"] == "digits" and pipe.metadata["source_model"] == ".."
    unet = UNet2DModel.from_pretrained(DIGITS_MODEL, subfolder="unet", use_safetensors=True).eval()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((4, *pipe.image_shape), dtype=np.float32)
    timestep = np.array([0, 10, 500, 999], dtype=np.int64)
    with torch.no_grad():
        expected = unet(torch.from_numpy(sample), torch.from_numpy(timestep)).sample.numpy()
    (actual,) = pipe.session.run(None, {"sample": sample, "timestep": timestep})
    assert np.abs(actual - expected).max() < 1e-4  # a stale export (weights retrained) fails here


# --- Nothing is loaded from outside the export folder (issue 11, item 7). ---
# These use a copy of the bundled export, so they also run where this onnxruntime cannot export (run them on the
# lowest declared onnxruntime: `PYTHONPATH=<onnxruntime 1.20 install> pytest -k "outside or external"`).


@pytest.fixture
def shipped_export(tmp_path) -> Path:
    if not (DIGITS_MODEL / "onnx" / "ddpm_onnx.json").is_file():
        pytest.skip("no bundled ONNX export")
    return Path(shutil.copytree(DIGITS_MODEL / "onnx", tmp_path / "onnx"))


@pytest.fixture
def foreign_model(shipped_export, tmp_path) -> Path:
    """A working model outside the export folder."""
    foreign = tmp_path / "x" / "foreign.onnx"
    foreign.parent.mkdir()
    shutil.copyfile(shipped_export / "model.onnx", foreign)
    return foreign


@pytest.mark.parametrize("model_file", ["../x/foreign.onnx", "{foreign}", "sub/../../x/foreign.onnx"])
def test_a_model_file_outside_the_export_folder_is_refused(shipped_export, foreign_model, model_file):
    metadata = json.loads((shipped_export / "ddpm_onnx.json").read_text())
    metadata["model_file"] = model_file.format(foreign=foreign_model)
    (shipped_export / "ddpm_onnx.json").write_text(json.dumps(metadata))
    with pytest.raises(OnnxModelError, match="outside the export folder") as error:
        OnnxDDPMPipeline.from_pretrained(shipped_export, provider="cpu")
    assert f"{shipped_export / 'ddpm_onnx.json'} names the model {metadata['model_file']!r}" in str(error.value)


def test_a_hub_cache_snapshot_of_links_into_its_blob_store_loads(shipped_export, tmp_path):
    """The Hugging Face cache keeps each file of a snapshot as a symbolic link into `blobs/`: names decide, not links."""
    snapshot, blobs = tmp_path / "snapshots" / "abc" / "onnx", tmp_path / "blobs"
    blobs.mkdir()
    for file in [p for p in shipped_export.rglob("*") if p.is_file()]:
        blob = blobs / f"blob{len(list(blobs.iterdir()))}"
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(shipped_export)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    pipe = OnnxDDPMPipeline.from_pretrained(snapshot, provider="cpu", num_threads=1)
    assert pipe(batch_size=1, num_inference_steps=2, scheduler="ddim", seed=0, progress_bar=False).images.shape == (1, 8, 8, 1)


def with_external_data(folder: Path, location: str) -> Path:
    """Rewrite `folder/model.onnx` to keep its weights in `model.onnx.data`, then record `location` for them."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder / "model.onnx.data"


def test_external_data_in_the_export_folder_loads(shipped_export):
    embedded = OnnxDDPMPipeline.from_pretrained(shipped_export, provider="cpu", num_threads=1)
    with_external_data(shipped_export, "model.onnx.data")
    external = OnnxDDPMPipeline.from_pretrained(shipped_export, provider="cpu", num_threads=1)
    np.testing.assert_array_equal(external(batch_size=2, num_inference_steps=3, seed=0, progress_bar=False).images,
                                  embedded(batch_size=2, num_inference_steps=3, seed=0, progress_bar=False).images)


@pytest.mark.parametrize("location", ["../secret/weights.data", "{secret}/weights.data"])
def test_external_data_outside_the_export_folder_is_refused(shipped_export, tmp_path, location):
    secret = tmp_path / "secret"
    secret.mkdir()
    data = with_external_data(shipped_export, location.format(secret=secret))
    shutil.move(data, secret / "weights.data")  # the weights now lie outside the folder, where the model points
    with pytest.raises(OnnxModelError, match="outside the export folder") as error:
        OnnxDDPMPipeline.from_pretrained(shipped_export, provider="cpu")
    assert location.format(secret=secret) in str(error.value) and "truncated or corrupt" not in str(error.value)
