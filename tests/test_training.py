"""Training: the recipe, mixed-precision-safe noising, batches by step, EMA, checkpoints, what a run leaves."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import fields

import pytest
import torch

from ddpm_plugin.checkpoints import list_checkpoints, load_checkpoint, load_latest_checkpoint
from ddpm_plugin.data import digits_split
from ddpm_plugin.ema import ExponentialMovingAverage
from ddpm_plugin.pipelines.diffusion_ops import q_sample
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.scheduler import paper_scheduler
from ddpm_plugin.training import NonFiniteLossError, TrainingConfig, batch_indices, learning_rate_at, train

# A short digits run: small batches, no logging of images unless asked.
QUICK = {"preset": "digits", "batch_size": 8, "log_every": 1, "log_with": "none", "checkpointing_steps": 2}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own `Accelerator`; drop accelerate's process-wide singletons between tests."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step digits run with TensorBoard, sample grids and at most 2 checkpoints kept."""
    output = tmp_path_factory.mktemp("run")
    config = TrainingConfig(**{**QUICK, "log_with": "tensorboard", "checkpointing_steps": 1}, output_dir=str(output),
                            max_steps=4, sample_every=2, num_sample_images=4, sample_inference_steps=5,
                            checkpoints_total_limit=2)
    result = train(config)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return output, result


def test_stock_add_noise_in_bf16_adds_no_noise_at_small_t_while_q_sample_does():
    scheduler = paper_scheduler("digits")
    diffusion = GaussianDiffusion.from_config(scheduler.config)
    generator = torch.Generator().manual_seed(0)
    x_start = torch.rand(10, 1, 8, 8, generator=generator).mul(2).sub(1).bfloat16()
    noise = torch.randn(10, 1, 8, 8, generator=generator).bfloat16()
    t = torch.arange(10)  # t < 10: 1 - alpha_bar_t < 1e-3, below bf16's resolution near 1

    stock = scheduler.add_noise(x_start, noise, t)  # diffusers casts alpha_bar_t to the sample's dtype
    assert torch.equal(stock, x_start), "stock add_noise was expected to leave bf16 samples unchanged at t < 10"

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = q_sample(diffusion, x_start, t, noise)
    assert ours.dtype == torch.float32
    expected = (torch.from_numpy(diffusion.sqrt_alphas_cumprod[:10])[:, None, None, None] * x_start.double()
                + torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod[:10])[:, None, None, None] * noise.double())
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-6)
    assert (ours - x_start.float()).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # noise at every t, even t = 0


def test_config_takes_recipe_values_from_the_preset_unless_overridden():
    config = TrainingConfig(preset="cifar10").resolve()
    assert (config.learning_rate, config.batch_size, config.warmup_steps, config.ema_decay) == (2e-4, 128, 5000, 0.9999)
    assert (config.dropout, config.random_flip, config.grad_clip_norm, config.dataset) == (0.1, True, 1.0, "cifar10")
    assert TrainingConfig(preset="celebahq").resolve().learning_rate == 2e-5
    assert TrainingConfig(preset="digits").resolve().random_flip is False
    assert TrainingConfig(preset="cifar10", learning_rate=1e-4, random_flip=False).resolve().random_flip is False
    with pytest.raises(ValueError, match="max_steps"):
        TrainingConfig(max_steps=0).resolve()


def test_learning_rate_warms_up_linearly_then_stays_constant():
    config = TrainingConfig(preset="cifar10").resolve()
    assert learning_rate_at(0, config) == pytest.approx(2e-4 / 5000)
    assert learning_rate_at(2499, config) == pytest.approx(1e-4)
    assert learning_rate_at(4999, config) == learning_rate_at(100_000, config) == 2e-4


def test_batches_are_disjoint_per_process_and_a_function_of_the_step():
    kwargs = {"seed": 3, "num_images": 100, "global_batch": 20}
    epoch = [batch_indices(s, rank=r, world_size=2, **kwargs) for s in range(5) for r in range(2)]
    assert torch.equal(torch.cat(epoch).sort().values, torch.arange(100))  # one epoch: every image exactly once
    assert not torch.equal(batch_indices(5, rank=0, world_size=2, **kwargs), epoch[0])  # a new order next epoch
    # resuming at step 7 needs no iteration over steps 0..6: the same call gives the same images
    assert torch.equal(batch_indices(7, rank=1, world_size=2, **kwargs), batch_indices(7, rank=1, world_size=2, **kwargs))
    assert torch.equal(batch_indices(7, rank=0, world_size=1, **kwargs)[10:], batch_indices(7, rank=1, world_size=2, **kwargs))


def test_ema_applies_its_fixed_decay_from_step_zero():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage([param], decay=0.9)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update([param])  # diffusers' EMAModel would use min(0.9, 1/10) = 0.1 here
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.1))
    ema.update([param])
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.19))


def test_run_leaves_pipeline_checkpoints_tensorboard_and_samples(finished_run):
    from diffusers import DiffusionPipeline, UNet2DModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddpm_plugin import DDPMPaperPipeline

    output, result = finished_run
    assert result.step == 4
    pipe = DDPMPaperPipeline.from_pretrained(output / "pipeline")
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, result.ema_unet.state_dict()[name]), name
    raw = UNet2DModel.from_pretrained(output / "pipeline" / "unet", variant="non_ema")
    assert all(torch.equal(v, result.unet.state_dict()[k]) for k, v in raw.state_dict().items())
    assert not torch.equal(raw.conv_in.weight, pipe.unet.conv_in.weight)
    assert type(DiffusionPipeline.from_pretrained(output / "pipeline")).__name__ == "DDPMPipeline"
    assert not any("checkpoint" in p.name for p in (output / "pipeline").rglob("*"))
    json_mode = (output / "pipeline" / "unet" / "config.json").stat().st_mode
    assert {p.stat().st_mode for p in (output / "pipeline").rglob("*.safetensors")} == {json_mode}  # not 0600

    assert [p.name for p in list_checkpoints(output / "checkpoints")] == ["checkpoint-00000003", "checkpoint-00000004"]
    suffixes = {p.suffix for p in (output / "checkpoints").rglob("*") if p.is_file()}
    assert suffixes == {".safetensors", ".json"}  # nothing pickled
    state = load_checkpoint(output / "checkpoints" / "checkpoint-00000004").trainer_state
    assert state["step"] == 4 and state["config"]["batch_size"] == 8 and state["data_position"]["micro_step"] == 4
    assert json.loads((output / "training_config.json").read_text())["ema_decay"] == 0.99

    assert sorted(p.name for p in (output / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    events = EventAccumulator(str(next((output / "tensorboard").rglob("events.out.tfevents*")).parent)).Reload()
    assert {"loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert "samples" in events.Tags()["images"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "a"), max_steps=4))
    train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "b"), max_steps=2))
    resumed = train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "b"), max_steps=4, resume_from_checkpoint="latest"))
    for model in ("unet", "ema_unet"):
        a, b = getattr(straight, model).state_dict(), getattr(resumed, model).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), model


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path):
    output, _ = finished_run
    checkpoints = shutil.copytree(output / "checkpoints", tmp_path / "checkpoints")
    latest = checkpoints / "checkpoint-00000004" / "optimizer.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    (checkpoints / ".tmp-checkpoint-00000005-1").mkdir()  # a write killed half-way is ignored
    with pytest.warns(UserWarning, match=r"checkpoint-00000004: optimizer\.safetensors does not match its checksum"):
        checkpoint = load_latest_checkpoint(checkpoints)
    assert checkpoint.step == 3
    (checkpoints / "checkpoint-00000003" / "manifest.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 2 checkpoints is usable"):
        load_latest_checkpoint(checkpoints)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = {**QUICK, "output_dir": str(tmp_path), "checkpointing_steps": 1}
    train(TrainingConfig(**config, max_steps=2))
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step (\d+).*last good checkpoint is .*checkpoint-") as error:
        train(TrainingConfig(**config, max_steps=20, learning_rate=1e20, warmup_steps=0, resume_from_checkpoint="latest"))
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert int(kept[-1].name.split("-")[1]) == bad_step - 1
    last = load_checkpoint(kept[-1])
    assert all(torch.isfinite(v).all() for v in [*last.model.values(), *last.ema.values()])


def test_every_config_field_is_a_ddpm_train_flag_whose_help_shows_its_default(capsys):
    from ddpm_plugin.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in fields(TrainingConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = " ".join(field.metadata["help"].split())  # the help is the field's metadata
        assert f"{flag} " in text and help_text in text, field.name
        after = text[text.index(help_text) + len(help_text):]
        assert "default" in help_text or after.startswith(" (default: "), field.name
    assert "--ema-decay EMA_DECAY EMA weight of the old average per step, from step 0 (paper: 0.9999) (default: the preset)" in text
    assert "--log-every LOG_EVERY optimizer steps between logged scalars (loss, lr, grad norm) (default: 50)" in text
    args = build_parser().parse_args(["train", "--preset", "digits", "--no-random-flip", "--learning-rate", "3e-4"])
    assert (args.random_flip, args.learning_rate, args.ema_decay) == (False, 3e-4, None)


def test_training_and_its_config_import_nothing_from_the_command_line():
    import ast
    from pathlib import Path

    import ddpm_plugin.training
    import ddpm_plugin.training_config

    for module in (ddpm_plugin.training, ddpm_plugin.training_config):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if "cli" in name.split(".")], module.__name__


def test_ddpm_train_on_bad_data_fails_naming_the_file(tmp_path, capsys):
    from ddpm_plugin.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.png").write_bytes(b"nope")
    code = main(["train", "--preset", "digits", "--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "bad.png: unreadable image" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_gradient_accumulation_and_bf16_autocast_runs_record_their_data_position(tmp_path):
    result = train(TrainingConfig(**QUICK, output_dir=str(tmp_path), max_steps=2, gradient_accumulation_steps=2,
                                  mixed_precision="bf16"))
    assert result.step == 2 and math.isfinite(result.loss)
    state = load_checkpoint(tmp_path / "checkpoints" / "checkpoint-00000002").trainer_state
    assert state["data_position"] == {"micro_step": 4, "permutation_seed": 0, "global_micro_batch": 4}
    assert next(result.unet.parameters()).dtype == torch.float32  # autocast, not bf16 weights


def test_image_folder_trains_with_loader_workers(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(16):
        Image.new("L", (8, 8), color=16 * i).save(tmp_path / "images" / f"{i}.png")
    result = train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "out"), dataset=str(tmp_path / "images"),
                                  max_steps=3, num_workers=1))
    assert result.step == 3 and (tmp_path / "out" / "pipeline" / "model_index.json").is_file()


def test_channels_last_defaults_on_for_cuda_and_off_for_cpu_unless_asked():
    config = TrainingConfig(preset="cifar10").resolve()
    assert config.for_device("cpu").channels_last is False  # NHWC measured no faster on CPU
    assert config.for_device("cuda").channels_last is True
    assert TrainingConfig(preset="digits", channels_last=True).resolve().for_device("cpu").channels_last is True
    assert config.compile is False  # the eager forward unless asked


def test_channels_last_run_resumes_exactly_and_matches_the_nchw_run_closely(tmp_path):
    channels_last = {**QUICK, "channels_last": True}
    straight = train(TrainingConfig(**channels_last, output_dir=str(tmp_path / "a"), max_steps=4))
    train(TrainingConfig(**channels_last, output_dir=str(tmp_path / "b"), max_steps=2))
    resumed = train(TrainingConfig(**channels_last, output_dir=str(tmp_path / "b"), max_steps=4,
                                   resume_from_checkpoint="latest"))
    nchw = train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "c"), max_steps=4, channels_last=False))
    a, b, c = (run.unet.state_dict() for run in (straight, resumed, nchw))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed optimizer state keeps the NHWC layout
    for k in a:  # another memory layout runs other kernels: the same math up to rounding
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_matches_eager_training_and_saves_plain_weights(tmp_path):
    eager = train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "eager"), max_steps=2))
    compiled = train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "compiled"), max_steps=2, compile=True))
    a, b = eager.unet.state_dict(), compiled.unet.state_dict()
    assert a.keys() == b.keys()  # no `_orig_mod.` prefixes from the compiled wrapper
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(compiled.pipeline_dir / "unet")  # the saved pipeline loads as a stock UNet


# --- Run folders: nothing lost (issue 12, items 1-3). ---


def folder_snapshot(folder) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its modification time and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def ddpm_train(capsys, *args: str) -> tuple[int, str, str]:
    from ddpm_plugin.cli import main

    code = main(["train", "--preset", "digits", "--batch-size", "8", "--log-every", "1", "--log-with", "none", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished_cli_run(tmp_path_factory):
    """A 2-step digits run made by `ddpm train`, checkpointed at steps 1 and 2. Tests copy it before changing it."""
    from ddpm_plugin.cli import main

    output = tmp_path_factory.mktemp("cli-run") / "run"
    assert main(["train", "--preset", "digits", "--batch-size", "8", "--log-with", "none", "--max-steps", "2",
                 "--checkpointing-steps", "1", "--output-dir", str(output)]) == 0
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return output


def test_a_second_train_into_a_run_folder_is_refused_and_touches_nothing(finished_cli_run, tmp_path, capsys):
    run = shutil.copytree(finished_cli_run, tmp_path / "run")
    before = folder_snapshot(run)
    code, out, err = ddpm_train(capsys, "--max-steps", "3", "--output-dir", str(run))
    assert code == 2
    assert err == (f"ddpm train: error: --output-dir already holds a run ({run}: training_config.json, checkpoints, "
                   "pipeline); pass --resume-from-checkpoint latest to continue it, --overwrite to start it over, or "
                   "another --output-dir.\n")
    assert folder_snapshot(run) == before


def test_overwrite_starts_the_run_over_without_mixing_old_files(finished_cli_run, tmp_path, capsys):
    run = shutil.copytree(finished_cli_run, tmp_path / "run")
    (run / "pipeline" / "onnx").mkdir()
    code, out, err = ddpm_train(capsys, "--max-steps", "1", "--checkpointing-steps", "1", "--output-dir", str(run),
                                "--overwrite")
    assert code == 0, err
    assert f"overwrite: removed training_config.json, checkpoints, pipeline from {run}" in out
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-00000001"]
    assert not (run / "pipeline" / "onnx").exists()
    assert json.loads((run / "training_config.json").read_text())["max_steps"] == 1


def test_resume_latest_without_a_checkpoint_says_it_starts_at_step_zero(tmp_path, capsys):
    code, out, err = ddpm_train(capsys, "--max-steps", "1", "--output-dir", str(tmp_path / "new"),
                                "--resume-from-checkpoint", "latest")
    assert code == 0, err
    assert f"no checkpoint in {tmp_path / 'new' / 'checkpoints'} to resume from: starting at step 0" in out


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_cli_run, tmp_path, capsys):
    run = shutil.copytree(finished_cli_run, tmp_path / "run")
    before = folder_snapshot(run)
    code, out, err = ddpm_train(capsys, "--max-steps", "2", "--output-dir", str(run), "--resume-from-checkpoint", "latest")
    assert code == 0, err
    assert (f"the run in {run} is finished: its checkpoint is at step 2 of max_steps 2; nothing was changed "
            "(raise max_steps to train further).") in out
    assert "trained" not in out and "nan" not in out
    assert folder_snapshot(run) == before


def test_resuming_with_another_preset_names_both_presets(finished_cli_run, tmp_path, capsys):
    from ddpm_plugin.cli import main

    run = shutil.copytree(finished_cli_run, tmp_path / "run")
    before = folder_snapshot(run)
    code = main(["train", "--preset", "mnist", "--batch-size", "8", "--output-dir", str(run), "--resume-from-checkpoint",
                 "latest", "--log-with", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"ddpm train: error: --preset is 'mnist' (28x28x1, 2,734,945 parameters), but "
                   f"{run / 'checkpoints' / 'checkpoint-00000002'} was trained with preset 'digits' (8x8x1, 701,345 "
                   "parameters); resume with --preset digits or train into another --output-dir.\n")
    assert folder_snapshot(run) == before


def test_logged_loss_after_a_resume_equals_the_uninterrupted_runs(tmp_path):
    # Checkpoints every 3 steps, logs every 5: the checkpoint at step 3 falls inside the logging window 1..5.
    config = {**QUICK, "checkpointing_steps": 3, "log_every": 5}
    straight = train(TrainingConfig(**config, output_dir=str(tmp_path / "a"), max_steps=5))
    train(TrainingConfig(**config, output_dir=str(tmp_path / "b"), max_steps=4))
    resumed = train(TrainingConfig(**config, output_dir=str(tmp_path / "b"), max_steps=5,
                                   resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "checkpoint-00000003")))
    assert resumed.loss == straight.loss  # the mean of steps 1..5, not of 4..5


def test_ddpm_train_errors_name_the_flag(tmp_path, capsys):
    for flags, message in [
        (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1), got 1.5."),
        (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1."),
        (["--learning-rate", "0"], "--learning-rate must be > 0, got 0.0."),
        (["--batch-size", "6", "--gradient-accumulation-steps", "4"],
         "--batch-size must be a multiple of --gradient-accumulation-steps (4), got 6."),
        (["--preset", "cifar100"], "--preset must be one of ['celebahq', 'cifar10', 'digits', 'lsun', 'mnist'], got 'cifar100'."),
        (["--resume-from-checkpoint", str(tmp_path / "nowhere")],
         f"--resume-from-checkpoint must be \"latest\" or a checkpoint folder; {tmp_path / 'nowhere'} is not a folder."),
        (["--overwrite", "--resume-from-checkpoint", "latest"],
         "--overwrite cannot be combined with --resume-from-checkpoint: resume a run or start it over."),
    ]:
        code, out, err = ddpm_train(capsys, "--output-dir", str(tmp_path / "o"), *flags)
        assert (code, err) == (2, f"ddpm train: error: {message}\n"), flags
    assert not (tmp_path / "o").exists()


def test_warnings_reach_the_user_as_one_line(finished_cli_run, tmp_path, capsys):
    run = shutil.copytree(finished_cli_run, tmp_path / "run")
    latest = run / "checkpoints" / "checkpoint-00000002" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    code, out, err = ddpm_train(capsys, "--max-steps", "2", "--output-dir", str(run), "--resume-from-checkpoint", "latest")
    assert code == 0, err
    assert err.splitlines()[0] == (f"warning: skipping a damaged checkpoint: {latest.parent}: model.safetensors does not "
                                   "match its checksum (truncated or altered). Falling back to the previous one.")
    assert "UserWarning" not in err and ".py:" not in err
    assert "resumed from" in out and "checkpoint-00000001" in out


def test_training_removes_an_onnx_export_made_from_earlier_weights(finished_cli_run, tmp_path, capsys):
    run = shutil.copytree(finished_cli_run, tmp_path / "run")
    export = run / "pipeline" / "onnx"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"an export of the step-2 weights")
    code, out, err = ddpm_train(capsys, "--max-steps", "3", "--output-dir", str(run), "--resume-from-checkpoint", "latest")
    assert code == 0, err
    assert f"removed {export}: it was exported from earlier weights (export again with `ddpm export`)" in out
    assert not export.exists() and (run / "pipeline" / "model_index.json").is_file()


# --- Gradient accumulation uses every micro-batch (item 4). ---


class ImagesWithNaN:
    """Digits, with NaN pixels in the images at `nan_indices` (float images: uint8 cannot hold NaN)."""

    def __init__(self, nan_indices: torch.Tensor):
        from ddpm_plugin.data import load_image_dataset

        self.images = load_image_dataset("digits", 8, 1).images.float()
        self.images[nan_indices] = float("nan")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def test_gradient_accumulation_checks_every_micro_batch_for_nan(tmp_path):
    # Step 1 is two micro-batches of 4; NaN in the first one only must stop the run at step 1.
    first_micro_batch = batch_indices(0, seed=0, num_images=len(digits_split("train")), global_batch=4, rank=0, world_size=1)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 1;"):
        train(TrainingConfig(**QUICK, output_dir=str(tmp_path), max_steps=3, gradient_accumulation_steps=2),
              dataset=ImagesWithNaN(first_micro_batch))


def test_gradient_accumulation_logs_the_mean_over_every_micro_batch(tmp_path):
    from accelerate.utils import set_seed

    from ddpm_plugin.data import load_image_dataset
    from ddpm_plugin.pipelines.diffusion_ops import to_model_range
    from ddpm_plugin.presets import PaperUNet2DModel
    from ddpm_plugin.training import training_loss

    result = train(TrainingConfig(**QUICK, output_dir=str(tmp_path), max_steps=1, gradient_accumulation_steps=2))
    # The two micro-batch losses of step 1, recomputed from the run's seeds: same weights, same noise draws.
    torch.manual_seed(0)
    unet = PaperUNet2DModel.from_preset("digits", dropout=0.0)
    set_seed(0)
    diffusion = GaussianDiffusion.from_config(paper_scheduler("digits").config)
    images = load_image_dataset("digits", 8, 1).images
    with torch.no_grad():
        losses = [float(training_loss(unet, diffusion, to_model_range(images[batch_indices(
            micro, seed=0, num_images=len(digits_split("train")), global_batch=4, rank=0, world_size=1)]), False)) for micro in (0, 1)]
    assert abs(losses[0] - losses[1]) > 1e-3  # the test can tell them apart
    assert result.loss == pytest.approx(sum(losses) / 2, rel=1e-6)


# --- Data errors during training, and a full disk (items 5, 6). ---


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_image_that_breaks_during_training_is_named(tmp_path, num_workers):
    from PIL import Image

    from ddpm_plugin.data import DataError, load_image_dataset

    (tmp_path / "images").mkdir()
    for i in range(8):
        Image.new("L", (8, 8), color=16 * i).save(tmp_path / "images" / f"{i}.png")
    dataset = load_image_dataset(str(tmp_path / "images"), 8, 1)
    (tmp_path / "images" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n replaced while training")  # after the up-front check
    with pytest.raises(DataError) as error:
        train(TrainingConfig(**QUICK, output_dir=str(tmp_path / "out"), max_steps=2, num_workers=num_workers), dataset=dataset)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'images' / '5.png'}: unreadable image (") and "\n" not in message


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: room for one digits checkpoint (11 MB), not two. Needs root (mount)."""
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(small_disk):
    from ddpm_plugin.checkpoints import CheckpointWriteError

    checkpoints = small_disk / "run" / "checkpoints"
    with pytest.raises(CheckpointWriteError) as error:
        train(TrainingConfig(**QUICK, output_dir=str(small_disk / "run"), max_steps=4))
    assert str(error.value) == (f"could not write checkpoint-00000004 in {checkpoints}: No space left on device. The "
                                "partial checkpoint was removed and the previous checkpoint checkpoint-00000002 is intact.")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-00000002"]
    assert load_checkpoint(checkpoints / "checkpoint-00000002").step == 2


def test_weights_that_became_non_finite_are_never_saved_and_are_named(tmp_path, capsys):
    # A step size beyond float32's range is a finite number to the config and infinite to Adam: the loss of step 1
    # was computed before the update and is finite, the weights after it are not.
    first = train(TrainingConfig(**QUICK, output_dir=str(tmp_path), max_steps=2))
    before = folder_snapshot(tmp_path)
    code, out, err = ddpm_train(capsys, "--output-dir", str(tmp_path), "--max-steps", "3", "--learning-rate", "1e45", "--warmup-steps", "0",
                                "--resume-from-checkpoint", "latest")
    assert code == 1 and "Traceback" not in err and err.count("ddpm train: error:") == 1
    assert "non-finite at step 3" in err and "conv_in.weight" in err and "EMA weights" in err
    assert "the last good checkpoint is" in err and "checkpoint-00000002" in err
    after = folder_snapshot(tmp_path)
    # The checkpoints and the pipeline are those of the good run; only the run's settings were written again.
    assert {k: v for k, v in after.items() if k != "training_config.json"} == {
        k: v for k, v in before.items() if k != "training_config.json"}
    assert first.step == 2


def test_non_finite_tensors_are_named():
    from ddpm_plugin.checkpoints import non_finite_tensors

    tensors = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]),
               "steps": torch.tensor([3])}
    assert non_finite_tensors(tensors) == ["b", "c"]
