"""An ONNX export folder as [`export_onnx`] writes it, opened and checked before onnxruntime sees a byte of it.

`open_export_folder` finds the export (the folder, or its `onnx/` sub-folder), reads `ddpm_onnx.json` and the
scheduler configuration through `ddpm_plugin.trust`, checks every field the sampler uses and the memory the
declared sizes ask for, and names the model files, each a regular file inside the folder. An external data file
that a model names must be one too: the model is parsed as the ONNX protobuf schema defines it (without loading
its weights), so every tensor's `location`, wherever it sits in the message, is checked, and so are the weights
held in the model: NaN or infinity is refused, naming the tensors.

Imports neither onnxruntime nor torch: the coefficient writer and the web page's server resolve exports with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ddpm_plugin.model_folder import check_image_size, check_schedule_size
from ddpm_plugin.trust import UntrustedInputError, read_bytes, read_json, regular_file
from ddpm_plugin.vocabulary import (
    ONNX_FLOAT32_MODEL_FILE,
    ONNX_METADATA_FILE,
    ONNX_MODEL_FILE,
    ONNX_SUBFOLDER,
    SCHEDULER_CONFIG,
)

from .freshness import check_export_fresh

FORMAT_VERSION = 1
MAX_MODEL_BYTES = 2 << 30  # protobuf's own limit on one serialised model; larger weights live in external data


class OnnxModelError(UntrustedInputError):
    """The ONNX folder or model cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class ExportFolder:
    """A checked export: its folder, metadata, scheduler configuration, image shape `(channels, height, width)`,
    model file and (for an int8 export that runs float32 for t < `float32_below_t`) its float32 model file."""

    folder: Path
    metadata: dict[str, Any]
    scheduler_config: dict[str, Any]
    image_shape: tuple[int, int, int]
    model_path: Path
    float32_path: Path | None
    float32_below_t: int


def resolve_export_folder(path: str | os.PathLike) -> Path:
    """`path` if it holds `ddpm_onnx.json`, else its `onnx/` sub-folder if that does."""
    folder = Path(path)
    if (folder / ONNX_METADATA_FILE).is_file():
        return folder
    if (folder / ONNX_SUBFOLDER / ONNX_METADATA_FILE).is_file():
        return folder / ONNX_SUBFOLDER
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist.")
    raise FileNotFoundError(
        f"{folder} holds no ONNX export ({ONNX_METADATA_FILE}, also not in {ONNX_SUBFOLDER}/); create one with "
        f"`ddpm export --model PIPELINE_DIR --output {folder}`."
    )


def model_file_in(folder: Path, model_file: Any) -> Path:
    """The model `ddpm_onnx.json` names, which must be a regular file inside the export folder (no `..`, no
    absolute path, no link): an export never loads a network from elsewhere."""
    try:
        return regular_file(folder, model_file, what="the model")
    except UntrustedInputError as error:
        raise OnnxModelError(
            f"{folder / ONNX_METADATA_FILE} names the model {model_file!r}, which lies outside the export folder "
            f"{folder} or is not a regular file there ({error}); refusing to load it. Re-export with `ddpm export`."
        ) from None
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the ONNX model {folder / str(model_file)} is missing; re-export with `ddpm export`."
        ) from None


def export_precision(metadata: dict[str, Any]) -> str:
    """The precision an export's metadata records (`fp32`, `fp16` or `int8`); exports older than the field say `fp16`."""
    return str(metadata.get("precision") or ("fp16" if metadata.get("fp16") else "fp32"))


def read_metadata(folder: Path) -> dict[str, Any]:
    """`ddpm_onnx.json`, refused unless it is a JSON object of this format version."""
    path = folder / ONNX_METADATA_FILE
    metadata = read_json(path)
    if not isinstance(metadata, dict):
        raise OnnxModelError(f"{path} must hold a JSON object, got {type(metadata).__name__}; re-export with `ddpm export`.")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise OnnxModelError(
            f"{path} has format_version {metadata.get('format_version')!r}; this ddpm-plugin reads version "
            f"{FORMAT_VERSION}. Re-export with `ddpm export`."
        )
    return metadata


def open_export_folder(path: str | os.PathLike) -> ExportFolder:
    r"""
    The export in `path` (or in its `onnx/` sub-folder), with every file and field the sampler uses checked.

    Raises:
        `FileNotFoundError`: the folder holds no export, or a file of it is missing.
        [`OnnxModelError`]: a field of `ddpm_onnx.json` is missing or of the wrong type, a declared size does not
        fit in memory, or a model (or its external data) lies outside the folder or is a link.
        [`StaleExportError`]: the export sits in a pipeline folder whose weights changed since it was made.
    """
    folder = resolve_export_folder(path)
    metadata = read_metadata(folder)
    where = str(folder / ONNX_METADATA_FILE)
    try:
        if "sample_size" not in metadata or "in_channels" not in metadata:
            missing = [name for name in ("sample_size", "in_channels") if name not in metadata]
            raise UntrustedInputError(f"{where} lacks {', '.join(f'`{name}`' for name in missing)}.")
        if isinstance(metadata["sample_size"], (list, tuple)):
            raise UntrustedInputError(f"{where}: `sample_size` must be a whole number >= 1, got {metadata['sample_size']!r}.")
        image_shape = check_image_size(metadata["sample_size"], metadata["in_channels"], where)
        float32_below_t = metadata.get("float32_below_t", 0) or 0
        if isinstance(float32_below_t, bool) or not isinstance(float32_below_t, int) or float32_below_t < 0:
            raise UntrustedInputError(f"{where}: `float32_below_t` must be an integer >= 0, got {float32_below_t!r}.")
        scheduler_path = regular_file(folder, SCHEDULER_CONFIG, what="the scheduler configuration")
        scheduler_config = read_json(scheduler_path)
        check_schedule_size(scheduler_config, str(scheduler_path))
    except OnnxModelError:
        raise
    except UntrustedInputError as error:
        raise OnnxModelError(f"{error} Re-export with `ddpm export`.") from None
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} Re-export the folder with `ddpm export`.") from None
    check_export_fresh(folder, metadata)
    model_path = model_file_in(folder, metadata.get("model_file", ONNX_MODEL_FILE))
    float32_path = None
    if float32_below_t:
        float32_path = model_file_in(folder, metadata.get("float32_model_file", ONNX_FLOAT32_MODEL_FILE))
    for file in filter(None, (model_path, float32_path)):
        check_model_file(file, folder)
    return ExportFolder(folder, metadata, scheduler_config, image_shape, model_path, float32_path, float32_below_t)


# --- External data: the ONNX protobuf schema, as far as tensors go. ---
# Field numbers of onnx.proto: message -> {field: (message type of a nested field)}; a `TensorProto`'s
# `external_data` (13) holds `StringStringEntryProto {key = 1, value = 2}` entries.
_SCHEMA: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 25: "FunctionProto"},
    "FunctionProto": {7: "NodeProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
    "TensorProto": {13: "StringStringEntryProto"},
}
# `TensorProto.data_type` of the float types whose values are checked for NaN and infinity.
_FLOAT_TYPES = {1: np.dtype("<f4"), 10: np.dtype("<f2"), 11: np.dtype("<f8")}
_MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); onnxruntime refuses deeper models itself


def _fields(data: memoryview, where: Path) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one protobuf message: an int for varint and fixed
    fields, a memoryview for length-delimited ones. `OnnxModelError` for bytes that are not a message."""
    offset, end = 0, len(data)
    damaged = OnnxModelError(f"{where} is not an ONNX model (truncated or corrupt); re-export with `ddpm export`.")

    def varint() -> int:
        nonlocal offset
        value = shift = 0
        while True:
            if offset >= end or shift > 63:
                raise damaged
            byte = data[offset]
            offset += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while offset < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            offset += size
            yield number, wire, None
        elif wire == 2:
            length = varint()
            if offset + length > end:
                raise damaged
            yield number, wire, data[offset:offset + length]
            offset += length
        else:
            raise damaged
    if offset != end:
        raise damaged


@dataclass
class ModelScan:
    """What [`scan_model`] finds in an ONNX model: every external data `location`, and the names of the tensors
    stored in the model whose float values are not all finite, with the count of such values."""

    locations: list[str]
    nonfinite: dict[str, int]


def _nonfinite_count(tensor: dict[int, list[Any]]) -> int:
    dtype = _FLOAT_TYPES.get(tensor.get(2, [0])[-1])
    if dtype is None:
        return 0
    values = [np.frombuffer(bytes(raw), dtype=dtype) for raw in tensor.get(9, []) if len(raw) % np.dtype(dtype).itemsize == 0]
    if dtype == np.float32:  # `float_data`, packed
        values += [np.frombuffer(bytes(raw), dtype="<f4") for raw in tensor.get(4, []) if len(raw) % 4 == 0]
    return sum(int((~np.isfinite(array)).sum()) for array in values)


def scan_model(model_path: Path) -> ModelScan:
    """Every `location` of every tensor's external data in the ONNX model `model_path`, wherever the tensor sits
    (initializers, sparse initializers, node attributes, subgraphs, functions), in any field order; and the
    tensors held in the model with NaN or infinite values."""
    data = memoryview(read_bytes(model_path, MAX_MODEL_BYTES))
    scan = ModelScan([], {})
    stack: list[tuple[memoryview, str, int]] = [(data, "ModelProto", 0)]
    while stack:
        message, kind, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise OnnxModelError(f"{model_path} nests subgraphs more than {_MAX_DEPTH} deep; refusing to load it.")
        nested = _SCHEMA.get(kind, {})
        tensor: dict[int, list[Any]] = {}
        for number, wire, value in _fields(message, model_path):
            if kind == "TensorProto" and number in (2, 4, 8, 9):
                tensor.setdefault(number, []).append(value)
            if wire == 2 and number in nested:
                if nested[number] == "StringStringEntryProto":
                    entry = {n: bytes(v) for n, w, v in _fields(value, model_path) if w == 2}
                    if entry.get(1) == b"location":
                        scan.locations.append(entry.get(2, b"").decode("utf-8", errors="replace"))
                else:
                    stack.append((value, nested[number], depth + 1))
        if kind == "TensorProto":
            count = _nonfinite_count(tensor)
            if count:
                name = bytes(tensor.get(8, [b"?"])[-1]).decode("utf-8", errors="replace")
                scan.nonfinite[name] = scan.nonfinite.get(name, 0) + count
    return scan


def external_data_locations(model_path: Path) -> list[str]:
    """Every external data `location` in the ONNX model `model_path` (see [`scan_model`])."""
    return scan_model(model_path).locations


def check_model_file(model_path: Path, folder: Path) -> None:
    """Refuse a model whose weights are kept in an external data file that is not a regular file inside the
    export folder (outside it, absolute, reached through a link, or a device), or whose weights held in the model
    are not all finite (naming them)."""
    scan = scan_model(model_path)
    for location in scan.locations:
        try:
            regular_file(folder, location, what="the external data file")
        except (UntrustedInputError, FileNotFoundError) as error:
            raise OnnxModelError(
                f"{model_path} keeps its weights in the external data file {location!r}, which lies outside the "
                f"export folder {folder} or is not a regular file there ({error}); refusing to load it. "
                "Re-export with `ddpm export`."
            ) from None
    if scan.nonfinite:
        names = ", ".join(f"{name} ({count:,})" for name, count in list(scan.nonfinite.items())[:5])
        raise OnnxModelError(
            f"{model_path} holds {sum(scan.nonfinite.values()):,} non-finite weights (NaN or infinity) in "
            f"{len(scan.nonfinite)} tensors: {names}{', ...' if len(scan.nonfinite) > 5 else ''}; it cannot be sampled "
            "(its training diverged)."
        )

