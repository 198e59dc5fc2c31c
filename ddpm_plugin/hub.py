"""Publishing a trained pipeline to the Hugging Face Hub: a Hub-ready folder, then one commit.

The Hub-ready folder holds what loads and nothing else:

```
model_index.json                 # stock classes: plain diffusers loads a DDPMPipeline
unet/config.json, unet/diffusion_pytorch_model.safetensors
scheduler/scheduler_config.json
pipeline_ddpm_paper.py, ...      # the pipeline file and its siblings, for trust_remote_code
onnx/                            # the ONNX export, when the pipeline folder has one
samples.png                      # a sample grid
README.md                        # the model card
```

Checkpoint folders, optimizer states, logs, TensorBoard runs and pickled weights are never copied, and the
upload filters them out once more. Of the Python files only `pipeline_ddpm_paper.py` and the files it imports
are published, and no file is read through a symbolic link that leads out of the pipeline folder. The token
comes from `HF_TOKEN` or the cached login and is handed to `huggingface_hub` only: every message and log line of
a push has it (and anything shaped like a token) redacted, even when a server echoes it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import __version__
from .model_card import load_evaluation_report, load_training_config, model_card
from .bundled import resolve_model
from .images import make_grid
from .sampling import ImageSampler
from .vocabulary import (
    ONNX_FLOAT32_MODEL_FILE,
    ONNX_METADATA_FILE,
    ONNX_MODEL_FILE,
    ONNX_SUBFOLDER,
    PIPELINE_MODULE,
    SCHEDULER_CONFIG,
)

CARD_FILE = "README.md"
GRID_FILE = "samples.png"
PIPELINE_CODE = f"{PIPELINE_MODULE}.py"
# An int8 export's float32 graph (run for small t) travels with it.
ONNX_FILES = (
    ONNX_MODEL_FILE, f"{ONNX_MODEL_FILE}.data", ONNX_FLOAT32_MODEL_FILE, f"{ONNX_FLOAT32_MODEL_FILE}.data",
    ONNX_METADATA_FILE, SCHEDULER_CONFIG,
)
DEFAULT_COMMIT_MESSAGE = f"Upload DDPM pipeline (ddpm-plugin {__version__})"
GRID_IMAGES = 16  # samples in the card's grid
GRID_TILE_PIXELS = 64  # small images are upscaled (nearest neighbour) to at least this size per sample
# What may be uploaded, and what never is even if it matches (applied to repository paths with fnmatch).
ALLOW_PATTERNS = (
    "model_index.json", "*.py", "*/config.json", "*/scheduler_config.json", "*/*.safetensors",
    *(f"{ONNX_SUBFOLDER}/{name}" for name in ONNX_FILES), GRID_FILE, CARD_FILE,
)
IGNORE_PATTERNS = (
    "*checkpoint*", "*optimizer*", "*random_states*", "*.pt", "*.pth", "*.bin", "*.pkl",
    "*.pickle", "*.ckpt", "*.npz", "*tfevents*", "logs/*", "runs/*", "*/logs/*", "*/runs/*", ".*", "*/.*",
)
# Hub tokens are `hf_` and at least 30 letters and digits; shorter `hf_` words (`hf_transfer`) are left alone.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "hf_[redacted]"
# Loggers that see requests during a push; each gets the redacting filter (a logger's filters do not reach the
# records of its children, so every existing child is covered too).
LOGGERS_OF_A_PUSH = ("huggingface_hub", "httpx", "httpcore", "urllib3", "requests")


class HubPublishError(OSError):
    """Publishing failed: no token, a rejected token, or the Hub did not confirm the commit."""


@dataclass(frozen=True)
class PushResult:
    """What [`push_folder`] published.

    Args:
        url (`str`): The repository page (of the branch, when not `main`).
        commit_url (`str`): The commit's page.
        commit_oid (`str`): The commit hash.
        files (`list[str]`): The repository paths uploaded by the commit.
        deleted (`list[str]`): The files of an earlier push that the commit deleted.
    """

    url: str
    commit_url: str
    commit_oid: str
    files: list[str]
    deleted: list[str]


def is_publishable(path_in_repo: str) -> bool:
    """Whether a repository path passes the allow-list and none of the ignore patterns."""
    return any(fnmatch.fnmatch(path_in_repo, p) for p in ALLOW_PATTERNS) and not any(
        fnmatch.fnmatch(path_in_repo, p) for p in IGNORE_PATTERNS
    )


def check_repo_id(repo_id: str) -> None:
    """Raise `ValueError` unless `repo_id` is a valid `"user/name"` (or `"organization/name"`) Hub id."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)  # raises HFValidationError, a ValueError
    if repo_id.count("/") != 1:
        raise ValueError(f"`repo_id` must be 'user/name' or 'organization/name', got {repo_id!r}.")


def find_pipeline_folder(model_dir: str | os.PathLike) -> Path:
    """`model_dir` if it is a pipeline folder, else the `pipeline/` folder of a `ddpm train` run folder
    ([`resolve_model`])."""
    folder = resolve_model(model_dir)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a pipeline folder (no model_index.json) nor a training run with one.")
    return folder


def pipeline_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """The files of the loadable layout (and of `onnx/`) in a pipeline folder, by repository path.

    Raises `FileNotFoundError` when `model_dir` is not a pipeline folder or a file the pipeline code imports is
    missing, and `ValueError` when a component has only pickled weights or a published file is reached through
    a symbolic link that leads out of the folder.
    """
    folder = find_pipeline_folder(model_dir).resolve()
    files = {"model_index.json": folder / "model_index.json", **pipeline_code(folder)}
    model_index = json.loads(_inside(folder, folder / "model_index.json").read_text())
    for component, value in model_index.items():
        if component.startswith("_") or not isinstance(value, list) or not (folder / component).is_dir():
            continue
        for path in sorted(_inside(folder, folder / component).iterdir()):
            if path.suffix in (".json", ".safetensors") and path.is_file():
                files[f"{component}/{path.name}"] = path
        if any(p.suffix in (".bin", ".pt", ".ckpt") for p in (folder / component).iterdir()) and not any(
            name.startswith(f"{component}/") and name.endswith(".safetensors") for name in files
        ):
            raise ValueError(f"{folder / component} has only pickled weights; re-save the pipeline (safetensors).")
    onnx = folder / ONNX_SUBFOLDER
    if onnx.is_dir():
        if not (_inside(folder, onnx) / "model.onnx").is_file():
            raise FileNotFoundError(f"{onnx} has no model.onnx; re-export with `ddpm export`.")
        files.update({f"{ONNX_SUBFOLDER}/{name}": onnx / name for name in ONNX_FILES if (onnx / name).is_file()})
    publishable = {name: path for name, path in files.items() if is_publishable(name)}
    for path in publishable.values():
        if path.is_relative_to(folder):  # the installed pipeline code lives elsewhere, by design
            _inside(folder, path)
    return publishable


def pipeline_code(folder: Path) -> dict[str, Path]:
    """`pipeline_ddpm_paper.py` of the folder and the files it imports (the ones diffusers' remote-code loader
    fetches), or the installed ones when the folder was saved without code. Nothing else: a `local_settings.py`
    beside them stays home."""
    source = folder / PIPELINE_CODE
    if not source.is_file() and not source.is_symlink():  # saved without its code (the bundled model ships none)
        return installed_pipeline_code()
    return _code_files(_inside(folder, source), folder)


def installed_pipeline_code() -> dict[str, Path]:
    """The installed `pipeline_ddpm_paper.py` and the sibling files it imports, as `save_pretrained` copies them."""
    from importlib.util import find_spec

    source = Path(find_spec(f"ddpm_plugin.pipelines.{PIPELINE_MODULE}").origin)
    return _code_files(source, source.parent)


def _code_files(source: Path, folder: Path) -> dict[str, Path]:
    """`source` and the files its relative imports reach, as diffusers resolves them, each checked to lie in
    `folder` before it is read."""
    from diffusers.utils.dynamic_modules_utils import get_relative_imports

    files, pending = {source.name: source}, [source]
    while pending:
        module = pending.pop()
        for name in get_relative_imports(str(module)):
            path = folder / f"{name}.py"
            if path.name in files:
                continue
            if not path.is_file():
                raise FileNotFoundError(f"{module.name} imports .{name}, but {path} is missing; re-save the pipeline.")
            files[path.name] = _inside(folder, path)
            pending.append(path)
    return files


def _inside(folder: Path, path: Path) -> Path:
    """`path` (in the resolved `folder`), or a `ValueError` naming the symbolic link that leads out of it."""
    if path.resolve().is_relative_to(folder):
        return path
    link = next((p for p in [*reversed(path.parents), path] if p.is_symlink() and not p.resolve().is_relative_to(folder)),
                path)
    raise ValueError(
        f"{link} is a symbolic link out of the pipeline folder {folder} (to {link.resolve()}); ddpm push never "
        "follows links out of the folder: copy the file in instead."
    )


def skipped_files(model_dir: str | os.PathLike, published: Iterable[str]) -> list[str]:
    """What a push leaves behind in the pipeline folder: each file that is not published, and each folder that
    holds nothing published (as `name/`), by path in the folder."""
    folder = find_pipeline_folder(model_dir)
    published = set(published)
    published_folders = {str(Path(name).parent) for name in published}
    skipped: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(directory.iterdir()):
            name = prefix + entry.name
            if entry.is_dir() and not entry.is_symlink() and name in published_folders:
                walk(entry, f"{name}/")
            elif name not in published:
                skipped.append(f"{name}/" if entry.is_dir() and not entry.is_symlink() else name)

    walk(folder, "")
    return skipped


def build_hub_folder(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    report: str | os.PathLike | None = None,
    grid: str | os.PathLike | None = None,
    sampler: ImageSampler | None = None,
    announce: Callable[[str], None] | None = None,
) -> list[str]:
    r"""
    Write the Hub-ready folder of a pipeline: its loadable layout, its ONNX export, a sample grid and the card.

    Every argument is checked before any work (sampling the grid takes minutes): a bad one raises a `ValueError`
    or `OSError` with a one-line message and writes nothing.

    Args:
        model_dir (`str` or `os.PathLike`):
            A folder written by [`DDPMPaperPipeline.save_pretrained`], optionally with an `onnx/` export, a
            `training_config.json` (here or in the folder above) and `evaluation/report.json`.
        output_dir (`str` or `os.PathLike`):
            The folder to write; it must be empty or absent.
        repo_id (`str`):
            The Hub repository, `"user/name"`, named in the card's examples.
        report (`str` or `os.PathLike`, *optional*):
            An evaluation report JSON; defaults to `model_dir/evaluation/report.json` when present.
        grid (`str` or `os.PathLike`, *optional*):
            A PNG to publish as the sample grid.
        sampler ([`ImageSampler`], *optional*):
            Draws the grid's `GRID_IMAGES` samples when no `grid` is given (`ddpm push` opens it with
            `ddpm_plugin.export.sampler.open_sampler`: the model's ONNX export when it has one).
        announce (`Callable[[str], None]`, *optional*):
            Called with a line before the long steps (sampling the grid), once the checks have passed.

    Returns:
        `list[str]`: the repository paths written, sorted.
    """
    check_repo_id(repo_id)
    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} is not empty; the Hub-ready folder needs a fresh one.")
    files = pipeline_files(model_dir)
    model_dir = find_pipeline_folder(model_dir)
    report = load_evaluation_report(model_dir, report)
    if grid is not None:
        check_grid(grid)
    elif sampler is None:
        raise ValueError("the card needs a sample grid: give `grid` (a PNG) or `sampler`.")
    elif announce is not None:
        announce(f"sampling the card's grid with {sampler.num_inference_steps} steps on {sampler.backend} "
                 "(a --grid PNG reuses an image instead)")
    for name, source in files.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, output / name)
    if f"{ONNX_SUBFOLDER}/{ONNX_METADATA_FILE}" in files:
        _point_onnx_metadata_at_repo(output / ONNX_SUBFOLDER / ONNX_METADATA_FILE)
    if grid is not None:
        shutil.copyfile(grid, output / GRID_FILE)
        caption = f"Samples from this pipeline ({Path(grid).name})."
    else:
        images = sampler(0, GRID_IMAGES)
        make_grid(images, scale=max(1, GRID_TILE_PIXELS // images.shape[1])).save(output / GRID_FILE)
        steps = (f"{sampler.num_inference_steps} ancestral sampling steps (Algorithm 2)" if sampler.scheduler == "ddpm"
                 else f"{sampler.num_inference_steps} DDIM steps (eta {sampler.eta})")
        runtime = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(sampler.backend, "PyTorch")
        caption = f"{GRID_IMAGES} samples, seed {sampler.seed}, {steps}, on {runtime}."
    card = model_card(
        model_dir, repo_id,
        report=report,
        training_config=load_training_config(model_dir),
        grid_file=GRID_FILE, grid_caption=caption,
        has_onnx=any(name.startswith(f"{ONNX_SUBFOLDER}/") for name in files),
    )
    card.save(output / CARD_FILE)
    return sorted([*files, GRID_FILE, CARD_FILE])


def check_grid(grid: str | os.PathLike) -> None:
    """A `ValueError` unless `grid` is a PNG picture (it is published as `samples.png`)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(grid)
    found = "a folder" if path.is_dir() else "no such file"
    if path.is_file():
        try:
            with Image.open(path) as picture:  # reads the header only
                found = f"a {picture.format} picture"
        except (UnidentifiedImageError, OSError):
            found = "not a picture"
    if found != "a PNG picture":
        raise ValueError(f"{grid} is not a PNG image ({found}); it is published as {GRID_FILE}.")


def _point_onnx_metadata_at_repo(metadata_path: Path) -> None:
    """The export records the absolute path of its source pipeline; in the repository that is the root `..`,
    and the exporting machine's file system is nobody's business."""
    metadata = json.loads(metadata_path.read_text())
    if "source_model" in metadata:
        metadata["source_model"] = ".."
        metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")


def upload_plan(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """The `(repository path, size in bytes)` of every file of `folder` that an upload would send."""
    root = Path(folder)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return [(path, (root / path).stat().st_size) for path in paths if is_publishable(path)]


def resolve_token(token: str | None = None) -> str:
    """`token`, else `HF_TOKEN`, else the cached login (`hf auth login`); a clear error when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPublishError(
            "no Hugging Face token found: set HF_TOKEN to a token with write access or run `hf auth login`."
        )
    return token


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    r"""
    Upload a Hub-ready folder in one commit, creating the repository (and the branch) if missing.

    Args:
        folder (`str` or `os.PathLike`): A folder written by [`build_hub_folder`].
        repo_id (`str`): `"user/name"` or `"organization/name"`.
        private (`bool`, *optional*, defaults to `False`): Create the repository private (an existing one keeps
            its visibility).
        revision (`str`, *optional*): The branch to commit to; created from `main` if missing. Defaults to `main`.
        commit_message (`str`, *optional*): The commit's summary.
        token (`str`, *optional*): A token; defaults to `HF_TOKEN` or the cached login.

    Returns:
        [`PushResult`]: the URLs and the files of the commit, once the Hub has confirmed it.

    Raises:
        [`HubPublishError`]: no token, a rejected token, or any failure before the Hub confirmed the commit.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    plan = upload_plan(folder)
    if CARD_FILE not in dict(plan) or "model_index.json" not in dict(plan):
        raise FileNotFoundError(f"{folder} is not a Hub-ready folder (README.md and model_index.json expected).")
    token = resolve_token(token)
    api = HfApi(token=token)
    try:
        with redacted_logs(token):
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            # Not `upload_folder`: with hf_xet (installed with huggingface_hub) it commits in batches, so a failure
            # can publish half a push; it cannot report what it deleted; and its delete_patterns lack ignore patterns.
            # Files of an earlier push that this one no longer has (an old ONNX export, say) would not match the
            # new weights: the commit deletes them. Files this module never publishes (a LICENSE, say) stay.
            stale = [path for path in api.list_repo_files(repo_id, revision=revision)
                     if is_publishable(path) and path not in dict(plan)]
            operations = [CommitOperationDelete(path_in_repo=path) for path in stale]
            operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=Path(folder) / path) for path, _ in plan]
            commit = api.create_commit(
                repo_id, operations, revision=revision, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            )
    except HfHubHTTPError as error:
        raise HubPublishError(redact(_explain(error, repo_id), token)) from None
    except Exception as error:  # unreachable Hub, a failed LFS transfer, a malformed answer
        raise HubPublishError(redact(
            f"the upload to {repo_id} failed before the Hub confirmed the commit ({type(error).__name__}: {error});"
            " nothing was published.", token)) from None
    url = str(repo_url) if revision in (None, "main") else f"{repo_url}/tree/{revision}"
    return PushResult(url=url, commit_url=commit.commit_url, commit_oid=commit.oid, files=[p for p, _ in plan],
                      deleted=stale)


def redact(text: str, token: str | None) -> str:
    """`text` with `token`, and anything shaped like a Hub token, replaced by `hf_[redacted]`."""
    if token:
        text = text.replace(token, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, text)


class _RedactingFilter(logging.Filter):
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.token), None
        return True


@contextmanager
def redacted_logs(token: str) -> Iterator[None]:
    """While the block runs, every log record of the Hub client and its HTTP stack is redacted with [`redact`]."""
    names = [name for name in logging.root.manager.loggerDict
             if any(name == prefix or name.startswith(f"{prefix}.") for prefix in LOGGERS_OF_A_PUSH)]
    loggers = [logging.getLogger(name) for name in {*LOGGERS_OF_A_PUSH, *names}]
    redacting = _RedactingFilter(token)
    for logger in loggers:
        logger.addFilter(redacting)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(redacting)


def _explain(error, repo_id: str) -> str:
    """A message for an HTTP error of the Hub that names the cause, never the token."""
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        return ("the Hub rejected the token (401 Unauthorized): it is invalid or expired. Set HF_TOKEN to a valid "
                "token with write access or run `hf auth login`. Nothing was published.")
    if status == 403:
        return f"the token may not write to {repo_id} (403 Forbidden): use a token with write access. Nothing was published."
    detail = f": {error.server_message}" if getattr(error, "server_message", None) else ""
    return f"the Hub did not confirm the commit to {repo_id} (HTTP {status}{detail}); nothing was published."
