"""Training checkpoints that lose nothing and load nothing unsafe.

A checkpoint is a folder `checkpoint-<step>` holding:

| file | contents |
|---|---|
| `model.safetensors` | the network's weights |
| `ema.safetensors` | the EMA weights (same keys) |
| `optimizer.safetensors` + `optimizer.json` | Adam's moment tensors; its hyper-parameters and any non-tensor state |
| `rng.safetensors` | torch (and CUDA) generator states of every process |
| `trainer_state.json` | step, data position, learning-rate schedule, python/NumPy RNG states of every process, config |
| `manifest.json` | SHA-256 of each file above, written last |

Tensors go to safetensors and everything else to JSON, so resuming unpickles nothing (safetensors rather than
`torch.save`, whose loading can run arbitrary code). The folder is written under a temporary name and renamed
into place (`os.replace`) only when complete, so a kill or a full disk mid-write leaves the previous checkpoint
intact; the manifest, which must list every file, catches a checkpoint damaged later (truncated, altered, missing
or extra files), and `load_latest_checkpoint` then falls back to the one before it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .trust import UntrustedInputError, file_sha256, read_json, regular_file, write_json

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors",
                    "trainer_state.json")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete or its files do not match its manifest."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the partial folder was removed."""


@dataclass
class Checkpoint:
    """The loaded contents of a checkpoint folder."""

    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a `torch.optim.Optimizer.state_dict()`
    rng_states: list[dict[str, Any]]  # one per process, as `capture_rng_state` returns them
    trainer_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


# --- RNG states. ---


def capture_rng_state() -> dict[str, Any]:
    """This process's python, NumPy, torch and CUDA generator states."""
    numpy_state = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "python": [version, list(python_state), gauss_next],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# --- Optimizer state as tensors + JSON. ---


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --- Writing. ---


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity, in order."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng_states: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Write `directory/checkpoint-<step>` atomically; then keep only the newest `total_limit` checkpoints.

    Call it on the main process only. `rng_states` holds one `capture_rng_state()` per process. Raises
    `CheckpointWriteError` when the folder cannot be written; the partial folder is then removed and every
    earlier checkpoint is left as it was.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step:08d}"
    for unfinished in directory.glob(f"{TEMP_PREFIX}*"):  # left by a run killed mid-write; one writer per folder
        shutil.rmtree(unfinished, ignore_errors=True)
    temp = directory / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        _write_checkpoint_files(temp, step, model, ema, optimizer, rng_states, trainer_state)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(temp, ignore_errors=True)
        kept = list_checkpoints(directory)
        previous = f"the previous checkpoint {kept[-1].name} is intact" if kept else "no earlier checkpoint exists"
        reason = getattr(error, "strerror", None) or re.sub(r" \(os error \d+\)$", "", str(error).split("I/O error: ")[-1])
        raise CheckpointWriteError(f"could not write {final.name} in {directory}: {reason}. The partial checkpoint "
                                   f"was removed and {previous}.") from error

    if final.exists():  # re-saving a step: move the old one aside first (rename cannot replace a full folder)
        stale = directory / f"{TEMP_PREFIX}stale-{final.name}-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(temp, final)
    _fsync(directory)

    if total_limit is not None:
        for old in list_checkpoints(directory)[:-total_limit]:
            shutil.rmtree(old)
    return final


def _write_checkpoint_files(temp: Path, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                            optimizer: dict[str, Any], rng_states: list[dict[str, Any]], trainer_state: dict[str, Any]) -> None:
    """Every file of a checkpoint, fsynced, the manifest last."""
    temp.mkdir()
    optimizer_tensors, optimizer_meta = _split_optimizer_state(optimizer)
    rng_tensors = {f"{rank}.torch": s["torch"] for rank, s in enumerate(rng_states)}
    rng_tensors.update({f"{rank}.cuda.{d}": c for rank, s in enumerate(rng_states) for d, c in enumerate(s["cuda"])})
    write_json(temp / "optimizer.json", optimizer_meta)
    python_numpy = [{"python": s["python"], "numpy": s["numpy"], "num_cuda": len(s["cuda"])} for s in rng_states]
    write_json(temp / "trainer_state.json", {**trainer_state, "step": step, "rng": python_numpy})
    save_file({k: v.contiguous() for k, v in model.items()}, temp / "model.safetensors")
    save_file(ema, temp / "ema.safetensors")
    save_file(optimizer_tensors, temp / "optimizer.safetensors")
    save_file(rng_tensors, temp / "rng.safetensors")
    match_json_permissions(temp)
    files = sorted(p.name for p in temp.iterdir())
    for name in files:
        _fsync(temp / name)
    write_json(temp / MANIFEST, {name: file_sha256(temp / name) for name in files})  # synced


def match_json_permissions(folder: str | os.PathLike) -> None:
    """Give every `.safetensors` file under `folder` the permissions of a JSON file beside it: safetensors creates
    its files readable by the owner only (0600), whatever the umask gave the JSON (usually 0644)."""
    for weights in Path(folder).rglob("*.safetensors"):
        beside = next(iter(sorted(weights.parent.glob("*.json"))), None)
        if beside is not None:
            shutil.copymode(beside, weights)


# --- Reading. ---


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders in `directory`, oldest first (half-written temporary folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and verify one checkpoint folder; raises `CorruptCheckpointError` saying what is wrong."""
    path = Path(path)
    _verify_manifest(path)
    try:
        trainer_state = read_json(path / "trainer_state.json")
        optimizer_meta = read_json(path / "optimizer.json")
        rng_tensors = load_file(path / "rng.safetensors")
        rng_states = [
            {
                "python": entry["python"],
                "numpy": entry["numpy"],
                "torch": rng_tensors[f"{rank}.torch"],
                "cuda": [rng_tensors[f"{rank}.cuda.{d}"] for d in range(entry["num_cuda"])],
            }
            for rank, entry in enumerate(trainer_state["rng"])
        ]
        return Checkpoint(
            path=path,
            model=load_file(path / "model.safetensors"),
            ema=load_file(path / "ema.safetensors"),
            optimizer=_join_optimizer_state(load_file(path / "optimizer.safetensors"), optimizer_meta),
            rng_states=rng_states,
            trainer_state=trainer_state,
        )
    except (OSError, ValueError, KeyError) as error:
        raise CorruptCheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error}).") from error


def _verify_manifest(path: Path) -> None:
    """Check that the manifest lists exactly the checkpoint's files, all of them regular files, present and
    matching (a link or a device is refused, never read)."""
    try:
        manifest = read_json(regular_file(path, MANIFEST))
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path}: missing or unreadable {MANIFEST} ({error}).") from error
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise CorruptCheckpointError(f"{path}: {MANIFEST} is not an object of file checksums.")
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST}
    unlisted = sorted((on_disk | set(CHECKPOINT_FILES)) - set(manifest))
    if unlisted:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} does not list {', '.join(unlisted)}.")
    for name, expected in manifest.items():
        try:
            file = regular_file(path, name, what=f"{MANIFEST} entry")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}: {name} is missing.") from None
        except UntrustedInputError as error:
            raise CorruptCheckpointError(f"{path}: {error}") from None
        if file_sha256(file) != expected:
            raise CorruptCheckpointError(f"{path}: {name} does not match its checksum (truncated or altered).")


def load_latest_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    """The newest checkpoint in `directory` that verifies, warning about each newer one that does not.

    Returns None when `directory` holds no checkpoint; raises `CorruptCheckpointError` when none verifies.
    """
    candidates = list_checkpoints(directory)
    for path in reversed(candidates):
        try:
            return load_checkpoint(path)
        except CorruptCheckpointError as error:
            warnings.warn(f"skipping a damaged checkpoint: {error} Falling back to the previous one.", stacklevel=2)
    if candidates:
        raise CorruptCheckpointError(f"{directory}: none of the {len(candidates)} checkpoints is usable.")
    return None
