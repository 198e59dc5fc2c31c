"""A saved folder loads three ways, offline, and nothing is unpickled."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

import ddpm_plugin.pipelines.pipeline_ddpm_paper as pipeline_module
from ddpm_plugin import DDPMPaperPipeline

# Runs in a fresh interpreter where `import ddpm_plugin` fails, as on a machine without the plugin.
BLOCK_PLUGIN = textwrap.dedent(
    """
    import sys
    class BlockPlugin:
        def find_spec(self, name, path=None, target=None):
            if name == "ddpm_plugin" or name.startswith("ddpm_plugin."):
                raise ImportError("ddpm_plugin is blocked in this test")
    sys.meta_path.insert(0, BlockPlugin())
    try:
        import ddpm_plugin
    except ImportError:
        pass
    else:
        raise SystemExit("the block did not work")
    """
)


def run_without_plugin(code: str, tmp_path: Path) -> str:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", BLOCK_PLUGIN + textwrap.dedent(code)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_saved_folder_records_stock_classes_and_carries_the_pipeline_file(tiny_pipeline_dir):
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    # One copy of the pipeline code: the saved file is the module itself, with the file it imports.
    assert (tiny_pipeline_dir / "pipeline_ddpm_paper.py").read_bytes() == Path(pipeline_module.__file__).read_bytes()
    assert (tiny_pipeline_dir / "gaussian_diffusion.py").is_file()
    assert (tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tiny_pipeline_dir.rglob("*.bin")) and not list(tiny_pipeline_dir.rglob("*.pt"))


def test_pipeline_module_imports_only_stdlib_numpy_torch_diffusers_and_siblings():
    source = Path(pipeline_module.__file__).read_text()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines()
                if line.startswith(("import ", "from ")) and not line.startswith("from .")}
    assert imported - sys.stdlib_module_names <= {"numpy", "torch", "diffusers"}, imported


def test_plain_diffusers_loads_a_stock_pipeline_with_the_paper_scheduler(tiny_pipeline_dir, tiny_pipeline):
    for loader in (DiffusionPipeline, DDPMPipeline):
        pipe = loader.from_pretrained(tiny_pipeline_dir)
        assert type(pipe) is DDPMPipeline
        assert type(pipe.unet) is UNet2DModel and type(pipe.scheduler) is DDPMScheduler
        assert pipe.scheduler.config.variance_type == "fixed_large"
        assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (1e-4, 0.02)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").images
    ours = tiny_pipeline(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0), output_type="np").images
    assert np.array_equal(stock, ours)


def test_plugin_class_loads_without_remote_code(tiny_pipeline_dir):
    pipe = DDPMPaperPipeline.from_pretrained(tiny_pipeline_dir)
    assert type(pipe) is DDPMPaperPipeline


def test_custom_pipeline_loads_where_the_plugin_cannot_be_imported(tiny_pipeline_dir, tmp_path):
    out = run_without_plugin(
        f"""
        import torch
        from diffusers import DiffusionPipeline, DDIMScheduler
        pipe = DiffusionPipeline.from_pretrained({str(tiny_pipeline_dir)!r}, custom_pipeline="pipeline_ddpm_paper",
                                                 trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        print(type(pipe).__name__, type(pipe).__module__)
        progression = pipe.progressive_generation(batch_size=1, num_inference_steps=20, every=10)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        images = pipe(batch_size=2, num_inference_steps=5, output_type="np").images
        print(progression.timesteps, images.shape)
        """,
        tmp_path,
    )
    assert "DDPMPaperPipeline diffusers_modules" in out
    assert "[500, 0] (2, 8, 8, 1)" in out


def test_remote_code_is_refused_without_trust(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tiny_pipeline_dir, custom_pipeline="pipeline_ddpm_paper")


def test_folder_saved_by_stock_ddpm_pipeline_loads_into_the_plugin(tiny_pipeline, tmp_path):
    stock = DDPMPipeline(unet=UNet2DModel.from_config(tiny_pipeline.unet.config), scheduler=tiny_pipeline.scheduler)
    stock.unet.load_state_dict(tiny_pipeline.unet.state_dict())
    stock.save_pretrained(tmp_path / "stock")
    pipe = DDPMPaperPipeline.from_pretrained(tmp_path / "stock")
    assert type(pipe) is DDPMPaperPipeline
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, tiny_pipeline.unet(x, t).sample, atol=1e-5, rtol=1e-5)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=5, output_type="np").images.shape == (1, 8, 8, 1)


def test_pickled_weights_are_written_when_asked_but_never_read(tiny_pipeline, tmp_path):
    folder = tmp_path / "bin"
    with pytest.warns(UserWarning, match="pickled"):
        tiny_pipeline.save_pretrained(folder, safe_serialization=False)
    pickled = folder / "unet" / "diffusion_pytorch_model.bin"
    assert pickled.is_file() and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # Loading reads the safetensors: a .bin that cannot be unpickled changes nothing.
    pickled.write_bytes(b"not a pickle")
    pipe = DDPMPaperPipeline.from_pretrained(folder)
    for name, tensor in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor), name


def test_folder_with_only_pickled_weights_is_refused(tiny_pipeline, tmp_path):
    stock = DDPMPipeline(unet=tiny_pipeline.unet, scheduler=tiny_pipeline.scheduler)
    stock.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert list((tmp_path / "pickled").rglob("*.bin"))
    with pytest.raises(EnvironmentError, match="safetensors"):
        DDPMPaperPipeline.from_pretrained(tmp_path / "pickled")


def test_missing_folder_gets_a_clear_error(tmp_path):
    from ddpm_plugin.sampling import load_pipeline

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path / "nowhere")
