"""Sharded, resumable, multi-process sampling (`ddpm sample --output-dir`): the paper's 50,000 FID samples.

A run writes `shard-00000.npz`, `shard-00001.npz`, ... (`images`: uint8 NHWC, one batch of `batch_size` images
each, shard k holding images k*batch_size onwards) and `manifest.json` into one folder:

- Image i depends only on (seed, i) (see `ddpm_plugin.sampling`), and each shard is one batch, so the images do
  not depend on how many processes drew them.
- Under `accelerate launch` the shards still missing are divided among the processes; every process writes its
  own shards, and the main process writes the manifest once all are done. Several machines need the folder on
  a file system they share.
- Each shard is written to a temporary file, synced and renamed, so a shard file is complete or absent; the
  SHA-256 of the bytes written goes into a record beside it (`shard-00000.npz.sha256`), and the shard itself holds
  the run's identity (`run_id`) and its first image. Started again with the same arguments, a run keeps only the
  shards that match their record, their run and their place, removes temporary files left by a killed run and
  draws the rest. A folder holding another run is refused, naming what differs.

The manifest records the run's identity (`run`): every file the sampler loads with its SHA-256, the resolved
schedule, sampler, steps, eta, seed, image shape, backend and precision; the model folder; and once the run is
complete (`complete: true`) every shard with its SHA-256, the number of processes and the throughput. A folder is
read back (`read_sample_folder`) only after the manifest and every shard it lists have been checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from .sampling import ImageSampler
from .trust import (
    TEMP_SUFFIX,
    UntrustedInputError,
    check_allocation,
    file_sha256,
    npz_headers,
    read_bytes,
    read_json,
    regular_file,
    write_atomically,
    write_json,
)
from .vocabulary import Backend, Sampler

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
SHARD_NAME = "shard-{:05d}.npz"
RECORD_SUFFIX = ".sha256"  # beside each shard: the SHA-256 of the bytes written
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SampleRun:
    """Everything that decides a run's images; a folder holds exactly one."""

    files: dict[str, str]  # every file the backend loads, relative to the model folder, with its SHA-256
    schedule: dict[str, Any]  # the resolved training schedule (see `sampling.resolved_schedule`)
    precision: str  # of the network the backend runs
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


def run_id(run: SampleRun) -> str:
    """SHA-256 of the run's identity, stored in each of its shards."""
    return hashlib.sha256(json.dumps(run_as_json(run), sort_keys=True).encode()).hexdigest()


def shard_path(output_dir: Path, shard: int) -> Path:
    return output_dir / SHARD_NAME.format(shard)


def record_path(shard: Path) -> Path:
    return shard.with_name(shard.name + RECORD_SUFFIX)


def load_shard(path: Path) -> np.ndarray:
    """A shard's images (uint8 NHWC); never unpickles."""
    with np.load(path, allow_pickle=False) as shard:
        return shard["images"]


def shard_is_kept(output_dir: Path, shard: int, run: SampleRun, identity: str) -> bool:
    """Whether shard `shard` of `run` may be kept: a regular file whose SHA-256 is the one recorded when it was
    written, holding uint8 `images` of the shard's shape (from the `.npy` header) and this run's identity and
    first image (so a shard copied from another run or another place is drawn again)."""
    path = shard_path(output_dir, shard)
    height, width, channels = run.image_shape
    first, count = run.shard_range(shard)
    try:
        recorded = read_bytes(record_path(path), 128).decode().strip()
        if file_sha256(path) != recorded:
            return False
        if npz_headers(path).get("images") != ((count, height, width, channels), np.dtype(np.uint8)):
            return False
        with np.load(path, allow_pickle=False) as data:
            return str(data["run_id"]) == identity and int(data["first_image"]) == first
    except (UntrustedInputError, OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, zipfile.BadZipFile):
        return False


def write_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    write_json(output_dir / MANIFEST, manifest)


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a sample folder; `FileNotFoundError` / `ValueError` with the reason when there is none."""
    path = Path(output_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{output_dir} is not a sample folder (no {MANIFEST}); write one with `ddpm sample --output-dir`.")
    manifest = read_json(regular_file(output_dir, MANIFEST, what="the manifest"))
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION or not isinstance(manifest.get("run"), dict):
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} is not a version-{FORMAT_VERSION} sample manifest (format_version {version!r}): "
                         f"draw the samples again into a new folder.")
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
    differences = run_differences(read_manifest(output_dir)["run"], run_as_json(run))
    if differences:
        raise ValueError(
            f"--output-dir {output_dir} holds samples of other arguments: {'; '.join(differences)}. Rerun with the "
            f"same arguments to resume, or choose another folder."
        )
    return True


def run_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between two runs' identities, one entry per file or setting, each naming it."""
    differences = []
    for key, value in wanted.items():
        before = recorded.get(key)
        if before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            if key == "files":
                differences += [f"{name} {'changed' if name in before else 'added'}" for name in sorted(value)
                                if before.get(name) != value[name]]
                differences += [f"{name} removed" for name in sorted(set(before) - set(value))]
            else:
                differences += [f"{key}.{name} {before.get(name)!r} (now {value.get(name)!r})"
                                for name in sorted(set(before) | set(value)) if before.get(name) != value.get(name)]
        else:
            differences.append(f"{key} {before!r} (now {value!r})")
    return differences


def remove_partial_files(output_dir: Path) -> int:
    """Delete the temporary files of shards a killed run was writing."""
    partial = list(output_dir.glob(f".*{TEMP_SUFFIX}"))
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def missing_shards(output_dir: Path, run: SampleRun) -> list[int]:
    identity = run_id(run)
    return [shard for shard in range(run.num_shards) if not shard_is_kept(output_dir, shard, run, identity)]


def save_shard(output_dir: Path, shard: int, images: np.ndarray, run: SampleRun, process_index: int) -> None:
    """Write the shard, then the record of its SHA-256 (a shard without its record is drawn again)."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images, process_index=np.int64(process_index), run_id=np.str_(run_id(run)),
             first_image=np.int64(run.shard_range(shard)[0]))
    content = buffer.getvalue()
    path = shard_path(output_dir, shard)
    write_atomically(path, content)
    write_atomically(record_path(path), hashlib.sha256(content).hexdigest() + "\n")


def complete_manifest(output_dir: Path, manifest: dict[str, Any], run: SampleRun, num_processes: int, wall_time_s: float,
                      drawn: int) -> dict[str, Any]:
    """The final manifest: every shard with its first image, size, the SHA-256 recorded when it was written and the
    process that wrote it (every shard was checked against its record just before)."""
    shards = []
    for shard in range(run.num_shards):
        path = shard_path(output_dir, shard)
        with np.load(path, allow_pickle=False) as data:
            process_index = int(data["process_index"])
        first, count = run.shard_range(shard)
        shards.append({"file": path.name, "first_image": first, "num_images": count, "process_index": process_index,
                       "sha256": read_bytes(record_path(path), 128).decode().strip()})
    return {**manifest, "complete": True, "shards": shards, "num_processes": num_processes,
            "images_drawn": drawn, "wall_time_s": round(wall_time_s, 3),
            "images_per_second": round(drawn / wall_time_s, 4) if wall_time_s > 0 else None}


def sample_to_shards(
    sampler: ImageSampler,
    output_dir: str | os.PathLike,
    num_images: int,
    batch_size: int = 64,
    state: Any = None,
) -> dict[str, Any]:
    r"""
    Draw `num_images` images with `sampler` into `.npz` shards and a manifest in `output_dir`, resuming what a
    previous run with the same sampler left. Call it in every process of `accelerate launch`.

    Args:
        sampler ([`ImageSampler`]): From `ddpm_plugin.export.sampler.open_sampler`; its loaded files, schedule,
            sampler, steps, eta, seed, backend and precision are the run's identity.
        output_dir (`str` or `os.PathLike`): The sample folder (created; shared by all processes).
        num_images (`int`): The number of images.
        batch_size (`int`, *optional*, defaults to 64): Images per batch and per shard.
        state (*optional*): The processes ([`process_state`]); defaults to `process_state()`.

    Returns:
        `dict`: the manifest (on every process; only the main process writes it).
    """
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if sampler.loaded is None:
        raise ValueError("`sampler` must say what it loaded: open it with ddpm_plugin.export.sampler.open_sampler.")
    state = state or process_state()
    channels, height, width = sampler.image_shape
    run = SampleRun(sampler.loaded.files, sampler.loaded.schedule, sampler.precision, sampler.backend,
                    sampler.scheduler, sampler.num_inference_steps, float(sampler.eta), sampler.seed, num_images,
                    batch_size, (height, width, channels))
    output_dir = Path(output_dir)
    resuming = check_folder_holds_run(output_dir, run)
    manifest = {"format_version": FORMAT_VERSION, "model": str(sampler.loaded.model), "run": run_as_json(run),
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
            save_shard(output_dir, shard, sampler(*run.shard_range(shard)), run, state.process_index)
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
        manifest = complete_manifest(output_dir, manifest, run, state.num_processes, wall_time_s, images_left)
        write_manifest(output_dir, {**manifest, "shards_reused": run.num_shards - len(missing)})
    state.wait_for_everyone()
    return read_manifest(output_dir)


class SampleFolderError(ValueError):
    """A sample folder whose manifest or shards fail a check; the message lists every defect, one per line."""


@dataclass(frozen=True)
class SampleFolder:
    """A complete sample folder whose manifest and shards passed every check of [`read_sample_folder`]."""

    path: Path
    manifest: dict[str, Any]
    shards: tuple[tuple[Path, int], ...]  # each shard file and its number of images, in image order

    @property
    def num_images(self) -> int:
        return sum(count for _, count in self.shards)

    def batches(self, num_images: int | None = None, progress_bar: bool = True) -> Iterator[np.ndarray]:
        """The images shard by shard (uint8 NHWC), at most `num_images`, with a progress bar."""
        if num_images is not None and num_images > self.num_images:
            raise ValueError(f"{self.path} holds {self.num_images} images, fewer than the {num_images} asked for.")
        wanted, read = (self.num_images if num_images is None else num_images), 0
        with tqdm(total=wanted, unit="img", desc="reading samples", disable=not progress_bar) as progress:
            for path, _ in self.shards:
                if read >= wanted:
                    break
                images = load_shard(path)[: wanted - read]
                read += len(images)
                progress.update(len(images))
                yield images


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _run_defects(run: dict[str, Any]) -> list[str]:
    defects = [f"run.{key} must be a positive integer, got {run.get(key)!r}"
               for key in ("num_images", "batch_size", "num_inference_steps") if not _positive_int(run.get(key))]
    shape = run.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_positive_int(side) for side in shape)):
        defects.append(f"run.image_shape must be [height, width, channels], got {shape!r}")
    defects += [f"run.{key} must be text, got {run.get(key)!r}" for key in ("backend", "scheduler")
                if not isinstance(run.get(key), str)]
    return defects


def _shard_defects(folder: Path, index: int, entry: Any, run: dict[str, Any], seen: dict[str, int]) -> tuple[list[str], Path | None]:
    """The defects of manifest entry `shards[index]`, and its file when it may be read."""
    where = f"shards[{index}]"
    if not isinstance(entry, dict):
        return [f"{where} must be an object, got {entry!r}"], None
    missing = [key for key in ("file", "first_image", "num_images", "sha256") if key not in entry]
    if missing:
        return [f"{where} lacks {', '.join(missing)}"], None
    first, count = index * run["batch_size"], min(run["batch_size"], run["num_images"] - index * run["batch_size"])
    defects = []
    if entry["first_image"] != first or isinstance(entry["first_image"], bool):
        defects.append(f"{where}.first_image must be {first}, got {entry['first_image']!r}")
    if entry["num_images"] != count or isinstance(entry["num_images"], bool):
        defects.append(f"{where}.num_images must be {count}, got {entry['num_images']!r}")
    if not isinstance(entry["sha256"], str) or not SHA256_PATTERN.match(entry["sha256"]):
        defects.append(f"{where}.sha256 must be 64 hexadecimal digits, got {entry['sha256']!r}")
    name = entry["file"]
    if isinstance(name, str) and name in seen:
        return [*defects, f"{where}.file {name!r} is also shards[{seen[name]}]"], None
    try:
        path = regular_file(folder, name, what=f"{where}.file")
    except (UntrustedInputError, FileNotFoundError) as error:
        return [*defects, str(error).rstrip(".")], None
    seen[name] = index
    height, width, channels = run["image_shape"]
    try:
        headers = npz_headers(path)
    except UntrustedInputError as error:
        return [*defects, str(error).rstrip(".")], None
    shape = (count, height, width, channels)
    if headers.get("images") != (shape, np.dtype(np.uint8)):
        got = "no `images` array" if "images" not in headers else f"{headers['images'][1]} {headers['images'][0]}"
        return [*defects, f"{where} {path.name}: `images` must be uint8 {shape}, got {got}"], None
    try:
        check_allocation(int(np.prod(shape)), f"{where} {path.name}")
    except UntrustedInputError as error:
        return [*defects, str(error).rstrip(".")], None
    if not defects and file_sha256(path) != entry["sha256"]:
        defects.append(f"{where} {path.name} does not match its SHA-256 in {MANIFEST}: the file changed after sampling")
    return defects, None if defects else path


def read_sample_folder(output_dir: str | os.PathLike) -> SampleFolder:
    """A complete sample folder, checked before an image is read: the manifest's run and shard list (every shard
    listed once, in order, none missing), each shard a regular file inside the folder whose `.npy` header gives
    uint8 images of its shape, a size this machine can hold, and the SHA-256 the manifest records.
    `SampleFolderError` lists every defect, one per line."""
    folder = Path(output_dir)
    manifest = read_manifest(folder)
    run = manifest["run"]
    if not manifest.get("complete"):
        raise ValueError(f"{folder} holds an unfinished run: run the same `ddpm sample` command again to complete it.")
    defects = _run_defects(run)
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        defects.append(f"shards must be a list, got {shards!r}")
    if not isinstance(manifest.get("model"), str):
        defects.append(f"model must be a folder name, got {manifest.get('model')!r}")
    checked: list[tuple[Path, int]] = []
    if not defects:
        expected = -(-run["num_images"] // run["batch_size"])
        if len(shards) != expected:
            defects.append(f"shards lists {len(shards)} shards, the run of {run['num_images']} images in batches of "
                           f"{run['batch_size']} has {expected}")
        seen: dict[str, int] = {}
        for index, entry in enumerate(shards[:expected]):
            shard_defects, path = _shard_defects(folder, index, entry, run, seen)
            defects += shard_defects
            if path is not None:
                checked.append((path, entry["num_images"]))
    if defects:
        raise SampleFolderError(f"{folder / MANIFEST}: " + "".join(f"\n  - {defect}" for defect in defects))
    return SampleFolder(folder, manifest, tuple(checked))


def iter_sample_batches(output_dir: str | os.PathLike, num_images: int | None = None, progress_bar: bool = True) -> Iterator[np.ndarray]:
    """The images of a complete sample folder, checked first (see [`read_sample_folder`]), shard by shard (uint8
    NHWC), at most `num_images`, with a progress bar."""
    yield from read_sample_folder(output_dir).batches(num_images, progress_bar)
