"""Sharded, resumable, multi-process sampling (`ddpm sample --output-dir`): the paper's 50,000 FID samples.

A run writes `shard-00000.npz`, `shard-00001.npz`, ... (`images`: uint8 NHWC, one batch of `batch_size` images
each, shard k holding images k*batch_size onwards) and `manifest.json` into one folder:

- Image i depends only on (seed, i) (see `ddpm_plugin.sampling`), and each shard is one batch, so the images do
  not depend on how many processes drew them.
- Under `accelerate launch` the shards still missing are divided among the processes; every process writes its
  own shards, and the main process writes the manifest once all are done. Several machines need the folder on
  a file system they share.
- Each shard is written to a temporary file, synced and renamed, so a shard file is complete or absent. Started
  again with the same arguments, a run keeps the shards that load with the right shape, removes temporary files
  left by a killed run and draws the rest. Other arguments in a folder that holds a run are refused.

The manifest records the arguments that decide the images (`run`), the model folder, and once the run is
complete (`complete: true`) every shard with its SHA-256, the number of processes and the throughput.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from .trust import file_sha256
from .sampling import load_image_sampler
from .vocabulary import Backend, Sampler

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_NAME = "shard-{:05d}.npz"
TEMP_SUFFIX = ".partial"


@dataclass(frozen=True)
class SampleRun:
    """Everything that decides a run's images; a folder holds exactly one."""

    weights_sha256: str  # of the network file the backend loads
    backend: Backend
    scheduler: Sampler
    num_inference_steps: int
    eta: float
    seed: int
    num_images: int
    batch_size: int  # images per shard, each shard one batch
    image_shape: tuple[int, int, int]  # (height, width, channels) of the stored uint8 images

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.batch_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """(first image, number of images) of `shard`."""
        start = shard * self.batch_size
        return start, min(self.batch_size, self.num_images - start)


class ProcessState:
    """The one process of a run not started by `accelerate launch` (or without Accelerate installed)."""

    process_index, local_process_index, num_processes, is_main_process = 0, 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def process_state(device: str | None = None) -> Any:
    """Accelerate's `PartialState` (the processes of `accelerate launch`: gloo on CPU with `ACCELERATE_USE_CPU=1`,
    NCCL on GPUs), or a single [`ProcessState`] when Accelerate is not installed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError:
        if world_size > 1:
            raise ImportError("several processes need Accelerate: pip install accelerate") from None
        return ProcessState()
    state = PartialState(cpu=device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes != world_size:
        raise ValueError(
            f"launched as {world_size} processes but Accelerate set up {state.num_processes}: on CPUs launch with "
            f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N."
        )
    return state


def network_sha256(model: str | os.PathLike, backend: Backend) -> str:
    """SHA-256 of the network files `backend` loads from the pipeline folder `model` (of their SHA-256s when
    there are several)."""
    if backend == "onnxruntime":
        from .export.onnx_pipeline import resolve_export_folder

        folder = resolve_export_folder(model)
        files = sorted(path for path in folder.iterdir() if path.is_file() and path.name.startswith("model.onnx"))
    else:
        files = sorted(Path(model, "unet").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model} holds no network weights for the {backend} backend.")
    return hashlib.sha256("".join(file_sha256(path) for path in files).encode()).hexdigest()


def shard_path(output_dir: Path, shard: int) -> Path:
    return output_dir / SHARD_NAME.format(shard)


def load_shard(path: Path) -> np.ndarray:
    """A shard's images (uint8 NHWC); never unpickles."""
    with np.load(path, allow_pickle=False) as shard:
        return shard["images"]


def shard_is_complete(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether `path` holds `images` of exactly `shape` (uint8) that read back without error (CRC checked)."""
    try:
        images = load_shard(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False
    return images.dtype == np.uint8 and images.shape == shape


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, sync it, and rename it to `path`."""
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    write_atomically(output_dir / MANIFEST, lambda file: file.write((json.dumps(manifest, indent=1) + "\n").encode()))


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a sample folder; `FileNotFoundError` / `ValueError` with the reason when there is none."""
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{output_dir} is not a sample folder (no {MANIFEST}); write one with `ddpm sample --output-dir`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION or "run" not in manifest:
        raise ValueError(f"{path} is not a version-{FORMAT_VERSION} sample manifest.")
    return manifest


def run_as_json(run: SampleRun) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(run)))


def check_folder_holds_run(output_dir: Path, run: SampleRun) -> bool:
    """Whether `output_dir` already holds (part of) `run`; `ValueError` when it holds anything else."""
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder.")
    if not (output_dir / MANIFEST).exists():
        if any(output_dir.iterdir()):
            raise ValueError(f"--output-dir {output_dir} is not empty and holds no {MANIFEST}: choose an empty or new folder.")
        return False
    recorded = read_manifest(output_dir)["run"]
    wanted = run_as_json(run)
    differences = [f"{key} {recorded.get(key)!r} (now {value!r})" for key, value in wanted.items() if recorded.get(key) != value]
    if differences:
        raise ValueError(
            f"--output-dir {output_dir} holds samples of other arguments: {'; '.join(differences)}. Rerun with the "
            f"same arguments to resume, or choose another folder."
        )
    return True


def remove_partial_files(output_dir: Path) -> int:
    """Delete the temporary files of shards a killed run was writing."""
    partial = list(output_dir.glob(f".*{TEMP_SUFFIX}"))
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def missing_shards(output_dir: Path, run: SampleRun) -> list[int]:
    height, width, channels = run.image_shape
    return [
        shard for shard in range(run.num_shards)
        if not shard_is_complete(shard_path(output_dir, shard), (run.shard_range(shard)[1], height, width, channels))
    ]


def save_shard(output_dir: Path, shard: int, images: np.ndarray, process_index: int) -> None:
    write_atomically(shard_path(output_dir, shard),
                     lambda file: np.savez(file, images=images, process_index=np.int64(process_index)))


def complete_manifest(output_dir: Path, manifest: dict[str, Any], num_processes: int, wall_time_s: float, drawn: int) -> dict[str, Any]:
    """The final manifest: every shard with its first image, size, SHA-256 and the process that wrote it."""
    run = manifest["run"]
    shards = []
    for shard in range(-(-run["num_images"] // run["batch_size"])):
        path = shard_path(output_dir, shard)
        with np.load(path, allow_pickle=False) as data:
            count, process_index = len(data["images"]), int(data["process_index"])
        shards.append({"file": path.name, "first_image": shard * run["batch_size"], "num_images": count,
                       "process_index": process_index, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return {**manifest, "complete": True, "shards": shards, "num_processes": num_processes,
            "images_drawn": drawn, "wall_time_s": round(wall_time_s, 3),
            "images_per_second": round(drawn / wall_time_s, 4) if wall_time_s > 0 else None}


def sample_to_shards(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_images: int,
    batch_size: int = 64,
    num_inference_steps: int = 1000,
    scheduler: Sampler = "ddpm",
    eta: float = 0.0,
    seed: int = 0,
    backend: Backend | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    r"""
    Draw `num_images` images of the pipeline folder `model` into `.npz` shards and a manifest in `output_dir`,
    resuming what a previous run with the same arguments left. Call it in every process of `accelerate launch`.

    Args:
        model (`str` or `os.PathLike`): The pipeline folder.
        output_dir (`str` or `os.PathLike`): The sample folder (created; shared by all processes).
        num_images (`int`): The number of images.
        batch_size (`int`, *optional*, defaults to 64): Images per batch and per shard.
        num_inference_steps (`int`, *optional*, defaults to 1000): Denoising steps (the paper: 1000).
        scheduler (`str`, *optional*, defaults to `"ddpm"`): `"ddpm"` or `"ddim"`.
        eta (`float`, *optional*, defaults to 0.0): DDIM's stochasticity.
        seed (`int`, *optional*, defaults to 0): The run's seed; image i depends on (seed, i) only.
        backend (`str`, *optional*): `"onnxruntime"` or `"pytorch"`; defaults to ONNX Runtime when the folder
            carries an export.
        device (`str`, *optional*): `"cpu"` or `"cuda"`; defaults to each process's Accelerate device.

    Returns:
        `dict`: the manifest (on every process; only the main process writes it).
    """
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    state = process_state(device)
    torch_device = str(getattr(state, "device", device or "cpu"))
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None  # accelerate launch sets it per process
    sampler = load_image_sampler(model, backend, scheduler, num_inference_steps, eta, seed, device=torch_device,
                                 num_threads=threads, progress_bar=state.is_main_process)
    channels, height, width = sampler.image_shape
    run = SampleRun(network_sha256(model, sampler.backend), sampler.backend, scheduler, num_inference_steps,
                    float(eta), seed, num_images, batch_size, (height, width, channels))
    output_dir = Path(output_dir)
    resuming = check_folder_holds_run(output_dir, run)
    manifest = {"format_version": FORMAT_VERSION, "model": str(Path(model).resolve()), "run": run_as_json(run),
                "complete": False}
    state.wait_for_everyone()  # all have checked the folder before the main process changes it
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(output_dir)
        if not resuming:
            write_manifest(output_dir, manifest)
    state.wait_for_everyone()
    # Every process lists the missing shards before any is written, so all agree on the division.
    missing = missing_shards(output_dir, run)
    state.wait_for_everyone()
    started = time.perf_counter()
    mine = missing[state.process_index :: state.num_processes]
    images_left = sum(run.shard_range(shard)[1] for shard in missing)
    with tqdm(total=images_left, unit="img", desc="sampling", disable=not state.is_main_process) as progress:
        for shard in mine:
            save_shard(output_dir, shard, sampler(*run.shard_range(shard)), state.process_index)
            # The main process counts the other processes' shards as its own: they draw at the same pace.
            progress.update(min(run.shard_range(shard)[1] * state.num_processes, progress.total - progress.n))
    state.wait_for_everyone()
    wall_time_s = time.perf_counter() - started
    still_missing = missing_shards(output_dir, run)
    if still_missing:
        raise FileNotFoundError(
            f"{len(still_missing)} shards are missing from {output_dir} after every process finished (first: "
            f"{SHARD_NAME.format(still_missing[0])}): on several machines the folder must be on a shared file system."
        )
    if state.is_main_process:
        manifest = complete_manifest(output_dir, manifest, state.num_processes, wall_time_s, images_left)
        write_manifest(output_dir, {**manifest, "shards_reused": run.num_shards - len(missing)})
    state.wait_for_everyone()
    return read_manifest(output_dir)


def iter_sample_batches(output_dir: str | os.PathLike, num_images: int | None = None, progress_bar: bool = True) -> Iterator[np.ndarray]:
    """The images of a complete sample folder, shard by shard (uint8 NHWC), at most `num_images`, with a progress bar."""
    output_dir = Path(output_dir)
    manifest = read_manifest(output_dir)
    total = manifest["run"]["num_images"]
    if not manifest.get("complete"):
        raise ValueError(f"{output_dir} holds an unfinished run: run the same `ddpm sample` command again to complete it.")
    if num_images is not None and num_images > total:
        raise ValueError(f"{output_dir} holds {total} images, fewer than the {num_images} asked for.")
    wanted, read = (total if num_images is None else num_images), 0
    with tqdm(total=wanted, unit="img", desc="reading samples", disable=not progress_bar) as progress:
        for entry in manifest["shards"]:
            if read >= wanted:
                break
            path = output_dir / entry["file"]
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                raise ValueError(f"{path} does not match its SHA-256 in {MANIFEST}: the file changed after sampling.")
            images = load_shard(path)[: wanted - read]
            read += len(images)
            progress.update(len(images))
            yield images
