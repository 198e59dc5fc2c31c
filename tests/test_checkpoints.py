"""Checkpoints: every file listed and verified, a full disk loses nothing, files readable like the JSON beside them."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_plugin.checkpoints import (
    MANIFEST,
    CorruptCheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRAIN = [sys.executable, "-m", "ddpm_plugin.cli", "train", "--preset", "digits", "--batch-size", "8",
         "--checkpointing-steps", "2", "--log-with", "none"]


def write_checkpoint(directory: Path, step: int) -> Path:
    """A small but complete checkpoint: real Adam state after one step and this process's RNG states."""
    param = torch.nn.Parameter(torch.arange(6.0))
    optimizer = torch.optim.Adam([param])
    param.sum().backward()
    optimizer.step()
    return save_checkpoint(directory, step=step, model={"w": param.detach()}, ema={"w": param.detach() * 0.5},
                           optimizer=optimizer.state_dict(), rng_states=[capture_rng_state()],
                           trainer_state={"config": {}})


def rewrite_manifest(checkpoint: Path, manifest) -> None:
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def two_checkpoints(tmp_path) -> list[Path]:
    return [write_checkpoint(tmp_path, 1), write_checkpoint(tmp_path, 2)]


@pytest.mark.parametrize("manifest", [[], "model.safetensors", 3, None, {"model.safetensors": 1}],
                         ids=["list", "string", "number", "null", "non-string checksum"])
def test_a_manifest_that_is_not_an_object_of_checksums_falls_back_to_the_previous_checkpoint(two_checkpoints, manifest):
    older, newer = two_checkpoints
    rewrite_manifest(newer, manifest)
    with pytest.raises(CorruptCheckpointError, match="is not an object of file checksums"):
        load_checkpoint(newer)
    with pytest.warns(UserWarning, match="checkpoint-00000002"):
        assert load_latest_checkpoint(older.parent).step == 1


def test_an_empty_manifest_verifies_nothing_and_is_refused(two_checkpoints):
    _, newer = two_checkpoints
    rewrite_manifest(newer, {})
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json does not list ema\.safetensors, model\.safetensors"):
        load_checkpoint(newer)


def test_every_file_of_a_checkpoint_must_be_listed(two_checkpoints):
    _, newer = two_checkpoints
    manifest = json.loads((newer / MANIFEST).read_text())
    assert set(manifest) == {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
                             "rng.safetensors", "trainer_state.json"}
    del manifest["rng.safetensors"]  # an unlisted file would be loaded unverified
    rewrite_manifest(newer, manifest)
    with pytest.raises(CorruptCheckpointError, match=r"does not list rng\.safetensors"):
        load_checkpoint(newer)


def test_an_extra_file_in_a_checkpoint_is_refused(two_checkpoints):
    _, newer = two_checkpoints
    (newer / "notes.safetensors").write_bytes(b"not part of the checkpoint")
    with pytest.raises(CorruptCheckpointError, match=r"does not list notes\.safetensors"):
        load_checkpoint(newer)


@pytest.mark.parametrize("name", ["model.safetensors", MANIFEST, "trainer_state.json"])
def test_a_link_to_a_device_in_a_checkpoint_is_refused_without_reading_it(two_checkpoints, name):
    older, newer = two_checkpoints
    (newer / name).unlink()
    (newer / name).symlink_to("/dev/zero")
    with pytest.raises(CorruptCheckpointError, match=f"{name} is a link"):
        load_checkpoint(newer)
    with pytest.warns(UserWarning, match="checkpoint-00000002"):
        assert load_latest_checkpoint(older.parent).step == 1


def test_a_checkpoint_written_before_this_check_still_loads(two_checkpoints):
    """Checkpoints of runs started with earlier versions list exactly these files: they verify and load."""
    _, newer = two_checkpoints
    state = json.loads((newer / "trainer_state.json").read_text())
    assert load_checkpoint(newer).trainer_state == state


def test_safetensors_files_get_the_permissions_of_the_json_beside_them(tmp_path):
    previous = os.umask(0o022)
    try:
        checkpoint = write_checkpoint(tmp_path, 1)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in checkpoint.iterdir()}
    assert modes["trainer_state.json"] == 0o644
    assert all(mode == modes["trainer_state.json"] for mode in modes.values()), modes  # safetensors alone writes 0600


def limit_file_size_to_1_mib() -> None:
    """In the child: files may not grow past 1 MiB, and writing past it fails with EFBIG instead of a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.slow
def test_a_write_failure_during_a_checkpoint_is_one_clear_line_and_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    first = subprocess.run([*TRAIN, "--max-steps", "2", "--output-dir", str(run)], env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run([*TRAIN, "--max-steps", "4", "--output-dir", str(run), "--resume-from-checkpoint", "latest"],
                             env=ENV, capture_output=True, text=True, preexec_fn=limit_file_size_to_1_mib)
    assert resumed.returncode == 1
    error = resumed.stderr.strip().splitlines()[-1]
    assert error == (f"ddpm train: error: could not write checkpoint-00000004 in {run / 'checkpoints'}: File too large. "
                     "The partial checkpoint was removed and the previous checkpoint checkpoint-00000002 is intact.")
    assert "Traceback" not in resumed.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-00000002"]  # no temporary folder
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["checkpoint-00000002"]
    assert load_checkpoint(run / "checkpoints" / "checkpoint-00000002").step == 2
