"""Shared fixtures: tiny pipelines so the suite stays fast on two CPU cores."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Callable

import pytest

# Nothing in the suite may reach the network: the Hub and the Inception weights are unreachable here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"

# A digits-shaped UNet small enough that 1000 steps take a fraction of a second.
TINY_UNET = {"block_out_channels": (16, 32), "norm_num_groups": 8}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Call it for a TCP port on 127.0.0.1 that is free now (the system picks it); each call may give another."""
    return _free_port


@pytest.fixture
def two_process_launch(free_port) -> list[str]:
    """The `accelerate launch` command that starts a script on two gloo CPU processes; run it with
    `ACCELERATE_USE_CPU=1` in the environment. (`--cpu --num_processes 2` would silently start ONE process;
    `--multi_gpu` with ACCELERATE_USE_CPU gives two.)"""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


@pytest.fixture(scope="session")
def test_output_dir() -> Path:
    TEST_OUTPUT.mkdir(exist_ok=True)
    return TEST_OUTPUT


def live_weights_(unet):
    """Draw the layers the paper's init starts at zero (residual outputs, attention output, `conv_out`) like the
    others, so an untrained test network predicts a non-trivial eps and comparisons between implementations can
    fail."""
    import torch

    from ddpm_plugin.presets import is_zero_init_layer

    with torch.no_grad():
        for name, module in unet.named_modules():
            if is_zero_init_layer(name):
                torch.nn.init.xavier_uniform_(module.weight)
    return unet


def make_tiny_pipeline(seed: int = 0, variance_type: str | None = None):
    import torch

    from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler

    torch.manual_seed(seed)
    unet = live_weights_(PaperUNet2DModel.from_preset("digits", **TINY_UNET))
    overrides = {} if variance_type is None else {"variance_type": variance_type}
    pipe = DDPMPaperPipeline(unet=unet.eval(), scheduler=paper_scheduler("digits", **overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipeline():
    return make_tiny_pipeline()


@pytest.fixture
def tiny_pipeline_factory():
    """`make_tiny_pipeline(seed=..., variance_type=...)`: a fresh tiny pipeline per call."""
    return make_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny digits pipeline (random weights). Tests must not modify it."""
    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    make_tiny_pipeline().save_pretrained(path)
    return path
