"""One vocabulary: every module takes its samplers, backends and variance types from `ddpm_plugin.vocabulary`."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import get_args

import numpy as np
import pytest

from ddpm_plugin.pipelines.gaussian_diffusion import SCHEDULER_OPTIONS
from ddpm_plugin.vocabulary import (
    PAPER_VARIANCE_TYPES,
    SAMPLERS,
    VarianceType,
    check_eta,
    check_sampler,
    check_steps,
)


def test_the_paper_variance_types_are_ones_the_scheduler_accepts():
    assert set(PAPER_VARIANCE_TYPES) <= set(get_args(VarianceType)) == set(SCHEDULER_OPTIONS["variance_type"])


def test_check_sampler_names_the_allowed_samplers():
    for sampler in SAMPLERS:
        check_sampler(sampler)
    with pytest.raises(ValueError, match=r"`scheduler` must be one of 'ddpm', 'ddim', 'dpmsolver\+\+', got 'pndm'"):
        check_sampler("pndm")


@pytest.mark.parametrize("steps", [0, 11, 2.0, True, "5"])
def test_check_steps_refuses_anything_but_a_whole_number_in_1_to_T(steps):
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be an integer in 1..10"):
        check_steps(steps, 10)


def test_check_steps_takes_numpy_integers():
    check_steps(np.int64(10), 10)


def test_the_vocabulary_imports_no_torch():
    code = "import sys, ddpm_plugin.vocabulary, ddpm_plugin.images; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_with_scheduler_gives_a_scheduler_of_its_own_sharing_the_network(tiny_pipeline):
    from diffusers import DDIMScheduler, DDPMScheduler

    from ddpm_plugin.sampling import with_scheduler

    ddim = with_scheduler(tiny_pipeline, "ddim")
    small = with_scheduler(tiny_pipeline, "ddpm", "fixed_small")
    assert isinstance(ddim.scheduler, DDIMScheduler) and isinstance(small.scheduler, DDPMScheduler)
    assert small.scheduler.config.variance_type == "fixed_small"
    assert ddim.unet is small.unet is tiny_pipeline.unet
    assert small.scheduler is not tiny_pipeline.scheduler
    with pytest.raises(ValueError, match=r"`scheduler` must be"):
        with_scheduler(tiny_pipeline, "euler")


@pytest.mark.parametrize(("scheduler", "name"), [("ddpm", "DDPM"), ("dpmsolver++", "DPM-Solver++")])
def test_check_eta_refuses_eta_for_the_samplers_without_one(scheduler, name):
    check_eta("ddim", 0.5)
    check_eta(scheduler, 0.0)
    with pytest.raises(ValueError, match=rf"`eta` is DDIM's; the {re.escape(name)} sampler has none"):
        check_eta(scheduler, 0.5)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf")])
def test_check_eta_refuses_negative_and_non_finite_values(eta):
    with pytest.raises(ValueError, match=r"`eta` must be a finite number >= 0"):
        check_eta("ddim", eta)
