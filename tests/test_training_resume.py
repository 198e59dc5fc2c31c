"""A run killed with SIGKILL at a random moment and resumed ends bitwise identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One thread in both runs: the same kernels, so the same floating-point sums.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MAX_STEPS = 40
ARGS = ["--preset", "digits", "--batch-size", "8", "--max-steps", str(MAX_STEPS), "--checkpointing-steps", "3",
        "--log-every", "1", "--log-with", "none"]


def train_command(output: Path, *extra: str, module: str = "ddpm_plugin.cli train") -> list[str]:
    return [sys.executable, "-m", *module.split(), *ARGS, "--output-dir", str(output), *extra]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training exited early: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The older entry point `python -m ddpm_plugin.training` runs the same command.
    uninterrupted = subprocess.Popen(train_command(straight, module="ddpm_plugin.training"), env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    victim = subprocess.Popen(train_command(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(killed / "checkpoints" / "checkpoint-00000003", victim)
    time.sleep(random.uniform(0.0, 1.0))  # anywhere in the following steps, possibly mid-checkpoint
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed / "pipeline").exists(), "the run finished before the kill; the test proved nothing"
    stopped_at = sorted(p.name for p in (killed / "checkpoints").iterdir())
    print("checkpoints at the kill:", stopped_at)

    resumed = subprocess.run(train_command(killed, "--resume-from-checkpoint", "latest"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read()

    final = f"checkpoint-{MAX_STEPS:08d}"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert (straight / "checkpoints" / final / name).read_bytes() == (killed / "checkpoints" / final / name).read_bytes(), name
    for weights in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.non_ema.safetensors"):
        assert (straight / "pipeline" / "unet" / weights).read_bytes() == (killed / "pipeline" / "unet" / weights).read_bytes()
