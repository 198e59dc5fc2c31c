"""Which engine samples a model fastest on this machine: `choose_engine` reads the machine's [`Capabilities`]
(bf16 instructions, physical cores, installed engines), the work per step (the network's GFLOP per image, which
`ddpm export` records, times the batch size) and the small table `engine_table.json`, which a benchmark writes.

The table's rules are read in order: the first whose `bf16` matches the machine and whose `max_gflop_per_step`
(null: no limit) is at least the work applies; within it, the first choice whose engine is installed and can run
the model wins. `threads: null` means every physical core.

Torch-free and engine-free: the engines are looked up with `importlib.util.find_spec`, never imported, so
`ddpm info` says what it would pick without torch.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from ddpm_plugin.bundled import resolve_model
from ddpm_plugin.sampling import default_backend
from ddpm_plugin.trust import read_json
from ddpm_plugin.vocabulary import BACKENDS, ONNX_SUBFOLDER, PRECISIONS, Backend, Precision

from .cpu import BF16_INSTRUCTION_SETS, cpu_name, has_bf16, instruction_sets, physical_cpu_count
from .onnx_folder import export_precision, read_metadata, resolve_export_folder

TABLE_FILE = Path(__file__).with_name("engine_table.json")
TABLE_FORMAT_VERSION = 1
# The modules each backend imports: OpenVINO's sampler is `OnnxDDPMPipeline`, which imports onnxruntime too.
BACKEND_MODULES: dict[Backend, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime",), "openvino": ("openvino", "onnxruntime"), "pytorch": ("torch", "diffusers"),
}
BACKEND_EXTRAS: dict[Backend, str] = {"onnxruntime": "onnxruntime", "openvino": "openvino", "pytorch": "torch"}
ONNXRUNTIME_BF16_MESSAGE = ("onnxruntime runs the export's own precision and has no bf16 path on the CPU: "
                            "use backend 'openvino' or 'pytorch' for bf16.")


class EngineTableError(ValueError):
    """The engine table is not one `choose_engine` can read; the message names the field."""


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers the engine choice: its CPU's instruction sets, its physical cores and the backends
    whose packages are installed."""

    instruction_sets: tuple[str, ...]
    physical_cores: int
    installed: frozenset[str]

    @classmethod
    def detect(cls) -> "Capabilities":
        """This machine's, without importing any engine."""
        installed = frozenset(backend for backend, modules in BACKEND_MODULES.items()
                              if all(importlib.util.find_spec(module) is not None for module in modules))
        return cls(instruction_sets(), physical_cpu_count(), installed)

    @property
    def has_bf16(self) -> bool:
        return has_bf16(self.instruction_sets)

    def bf16_words(self) -> str:
        found = [name for name in BF16_INSTRUCTION_SETS if name in self.instruction_sets]
        return f"this CPU multiplies bf16 in hardware ({', '.join(found)})" if found else "this CPU has no bf16 instructions"


@dataclass(frozen=True)
class TableChoice:
    backend: Backend
    precision: Precision
    threads: int | None  # None: every physical core


@dataclass(frozen=True)
class Rule:
    bf16: bool
    max_gflop_per_step: float | None  # None: no limit
    choices: tuple[TableChoice, ...]


@dataclass(frozen=True)
class EngineTable:
    """The rules of `engine_table.json`, with where they were measured."""

    rules: tuple[Rule, ...]
    cpu: str
    threads: int
    results: str
    measured_by: str
    source: str = field(default=str(TABLE_FILE), compare=False)

    def where_measured(self) -> str:
        return f"measured on {self.cpu} with {self.threads} threads: {self.results}"


@dataclass(frozen=True)
class EngineChoice:
    """The backend and precision `open_sampler` runs, its threads, and why, in one sentence."""

    backend: Backend
    precision: str  # fp32 or bf16; with onnxruntime, the export's own precision (fp32, fp16 or int8)
    num_threads: int
    reason: str


def _field(data: dict, key: str, where: str) -> Any:
    if key not in data:
        raise EngineTableError(f"{where}: the engine table lacks `{key}`.")
    return data[key]


def _whole(value: Any, name: str, where: str, allow_null: bool = False) -> int | None:
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        null = " or null" if allow_null else ""
        raise EngineTableError(f"{where}: `{name}` must be a whole number >= 1{null}, got {value!r}.")
    return int(value)


def parse_table(data: Any, where: str = str(TABLE_FILE)) -> EngineTable:
    """The [`EngineTable`] in `data` (the parsed JSON), or `EngineTableError` naming the first defective field."""
    if not isinstance(data, dict):
        raise EngineTableError(f"{where}: the engine table must be a JSON object, got {type(data).__name__}.")
    if _field(data, "format_version", where) != TABLE_FORMAT_VERSION:
        raise EngineTableError(f"{where}: `format_version` must be {TABLE_FORMAT_VERSION}, got {data['format_version']!r}.")
    measured_on = _field(data, "measured_on", where)
    if not isinstance(measured_on, dict):
        raise EngineTableError(f"{where}: `measured_on` must be an object, got {measured_on!r}.")
    for key in ("cpu", "results", "measured_by"):
        value = _field(measured_on if key == "cpu" else data, key, where)
        if not isinstance(value, str) or not value:
            raise EngineTableError(f"{where}: `{'measured_on.' if key == 'cpu' else ''}{key}` must be text, got {value!r}.")
    sets = _field(measured_on, "instruction_sets", where)
    if not isinstance(sets, list) or not all(isinstance(name, str) for name in sets):
        raise EngineTableError(f"{where}: `measured_on.instruction_sets` must be a list of names, got {sets!r}.")
    threads = _whole(_field(measured_on, "threads", where), "measured_on.threads", where)
    rules_data = _field(data, "rules", where)
    if not isinstance(rules_data, list) or not rules_data:
        raise EngineTableError(f"{where}: `rules` must be a non-empty list, got {rules_data!r}.")
    rules = tuple(_parse_rule(rule, f"rules[{index}]", where) for index, rule in enumerate(rules_data))
    for bf16 in (True, False):
        if not any(rule.bf16 is bf16 and rule.max_gflop_per_step is None for rule in rules):
            raise EngineTableError(f"{where}: `rules` needs a rule with `bf16` {str(bf16).lower()} and "
                                   f"`max_gflop_per_step` null, for any work.")
    return EngineTable(rules, measured_on["cpu"], threads, data["results"], data["measured_by"], where)


def _parse_rule(rule: Any, name: str, where: str) -> Rule:
    if not isinstance(rule, dict):
        raise EngineTableError(f"{where}: `{name}` must be an object, got {rule!r}.")
    bf16 = _field(rule, "bf16", f"{where} {name}")
    if not isinstance(bf16, bool):
        raise EngineTableError(f"{where}: `{name}.bf16` must be true or false, got {bf16!r}.")
    limit = _field(rule, "max_gflop_per_step", f"{where} {name}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Real) or not math.isfinite(limit)
                              or limit <= 0):
        raise EngineTableError(f"{where}: `{name}.max_gflop_per_step` must be a number > 0 or null, got {limit!r}.")
    choices = _field(rule, "choices", f"{where} {name}")
    if not isinstance(choices, list) or not choices:
        raise EngineTableError(f"{where}: `{name}.choices` must be a non-empty list, got {choices!r}.")
    parsed = []
    for index, choice in enumerate(choices):
        at = f"{name}.choices[{index}]"
        if not isinstance(choice, dict):
            raise EngineTableError(f"{where}: `{at}` must be an object, got {choice!r}.")
        backend, precision = _field(choice, "backend", f"{where} {at}"), _field(choice, "precision", f"{where} {at}")
        if backend not in BACKENDS:
            raise EngineTableError(f"{where}: `{at}.backend` must be one of {list(BACKENDS)}, got {backend!r}.")
        if precision not in PRECISIONS:
            raise EngineTableError(f"{where}: `{at}.precision` must be one of {list(PRECISIONS)}, got {precision!r}.")
        if backend == "onnxruntime" and precision == "bf16":
            raise EngineTableError(f"{where}: `{at}.precision` bf16: {ONNXRUNTIME_BF16_MESSAGE}")
        threads = _whole(_field(choice, "threads", f"{where} {at}"), f"{at}.threads", where, allow_null=True)
        parsed.append(TableChoice(backend, precision, threads))
    return Rule(bf16, None if limit is None else float(limit), tuple(parsed))


@functools.lru_cache(maxsize=4)
def load_table(path: str | os.PathLike = TABLE_FILE) -> EngineTable:
    """The engine table in `path` (the shipped `engine_table.json` by default), read and checked once."""
    return parse_table(read_json(path), str(path))


@dataclass(frozen=True)
class _Model:
    """What the choice needs to know of a model folder."""

    export_precision: str | None  # None: no ONNX export
    gflop_per_image: float | None
    pipeline: bool  # a pipeline folder PyTorch can load

    def runs(self, backend: Backend) -> str | None:
        """Why `backend` cannot run this model, or None."""
        if backend == "pytorch":
            return None if self.pipeline else "no pipeline folder"
        if self.export_precision is None:
            return "no ONNX export"
        if backend == "openvino" and self.export_precision != "fp32":
            return f"runs a float32 export, this one is {self.export_precision}"
        return None


def _inspect(model: Path) -> _Model:
    pipeline = (model / "model_index.json").is_file()
    try:
        folder = resolve_export_folder(model)
    except FileNotFoundError:
        return _Model(None, None, pipeline)
    metadata = read_metadata(folder)
    precision = export_precision(metadata)
    gflop = metadata.get("gflop_per_image")
    if gflop is not None and (isinstance(gflop, bool) or not isinstance(gflop, Real) or not math.isfinite(gflop)
                              or gflop <= 0):
        raise ValueError(f"{folder / 'ddpm_onnx.json'}: `gflop_per_image` must be a number > 0, got {gflop!r}; "
                         f"re-export with `ddpm export`.")
    return _Model(precision, None if gflop is None else float(gflop), pipeline)


def check_choice_arguments(batch_size: int, backend: str | None, precision: str | None) -> None:
    """Refuse a batch size, backend or precision `choose_engine` cannot take, naming it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a whole number >= 1, got {batch_size!r}.")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {list(PRECISIONS)}, got {precision!r}.")
    if backend == "onnxruntime" and precision == "bf16":
        raise ValueError(ONNXRUNTIME_BF16_MESSAGE)


def choose_engine(
    model: str | os.PathLike,
    batch_size: int = 1,
    backend: Backend | None = None,
    precision: Precision | None = None,
    capabilities: Capabilities | None = None,
    table: EngineTable | None = None,
) -> EngineChoice:
    r"""
    The backend, precision and threads that sample `model` fastest here, by the engine table.

    Args:
        model (`str` or `os.PathLike`): A pipeline folder, an export folder or a bundled model's name.
        batch_size (`int`, *optional*, defaults to 1): Images per network call; the work per step is the export's
            `gflop_per_image` times it.
        backend (`str`, *optional*): Forces the backend; the table then picks among its choices only.
        precision (`str`, *optional*): Forces the precision (`"fp32"` or `"bf16"`) likewise.
        capabilities ([`Capabilities`], *optional*): The machine's; detected when None.
        table ([`EngineTable`], *optional*): The rules; the shipped `engine_table.json` when None.

    Returns:
        [`EngineChoice`]: the choice and the sentence that says why.
    """
    check_choice_arguments(batch_size, backend, precision)
    capabilities = capabilities or Capabilities.detect()
    table = table or load_table()
    folder = Path(resolve_model(model))
    facts = _inspect(folder)
    forced = " and ".join(f"--{name} {value}" for name, value in (("backend", backend), ("precision", precision))
                          if value is not None)
    if facts.gflop_per_image is None:
        if facts.export_precision is None:
            why = f"{folder} carries no ONNX export (`ddpm export --model {folder} --output {folder / ONNX_SUBFOLDER}`)"
        else:
            why = (f"its export does not record the network's FLOPs (re-export with `ddpm export` to record the "
                   f"network's FLOPs)")
        return _fallback(folder, backend, precision, facts, capabilities, f"{why}, so the engine table does not apply")
    work = facts.gflop_per_image * batch_size
    number, rule = next((number, rule) for number, rule in enumerate(table.rules, 1)
                        if rule.bf16 is capabilities.has_bf16
                        and (rule.max_gflop_per_step is None or work <= rule.max_gflop_per_step))
    skipped = []
    for choice in rule.choices:
        if backend is not None and choice.backend != backend:
            continue
        chosen_precision = facts.export_precision if choice.backend == "onnxruntime" else choice.precision
        if precision is not None and chosen_precision != precision:
            continue
        problem = (None if choice.backend in capabilities.installed
                   else f"not installed (pip install \"ddpm-plugin[{BACKEND_EXTRAS[choice.backend]}]\")")
        problem = problem or facts.runs(choice.backend)
        if problem:
            skipped.append(f"{choice.backend} {choice.precision}: {problem}")
            continue
        threads = min(choice.threads, capabilities.physical_cores) if choice.threads else capabilities.physical_cores
        limit = ("any work" if rule.max_gflop_per_step is None
                 else f"work up to {rule.max_gflop_per_step:g} GFLOP per step")
        reason = (f"{capabilities.bf16_words()} and a step is {work:.3g} GFLOP ({facts.gflop_per_image:.3g} per "
                  f"image x batch {batch_size}): rule {number} of the engine table ({limit}"
                  f"{', ' + forced if forced else ''}; {table.where_measured()})"
                  + (f"; skipped {'; '.join(skipped)}" if skipped else "") + ".")
        return EngineChoice(choice.backend, chosen_precision, threads, reason)
    why = f"rule {number} of the engine table has no runnable choice" + (f" for {forced}" if forced else "")
    if skipped:
        why += f" ({'; '.join(skipped)})"
    return _fallback(folder, backend, precision, facts, capabilities, why)


def _fallback(folder: Path, backend: Backend | None, precision: Precision | None, facts: _Model,
              capabilities: Capabilities, why: str) -> EngineChoice:
    """The choice made without the table: the forced backend or [`default_backend`] (OpenVINO or PyTorch in its
    place for a forced bf16), at the forced precision, or at the export's (onnxruntime) or float32 (the others),
    on every physical core."""
    if backend is None:
        backend = default_backend(folder)
        if precision == "bf16" and backend == "onnxruntime":
            runs_openvino = "openvino" in capabilities.installed and facts.runs("openvino") is None
            backend = "openvino" if runs_openvino else "pytorch"
    chosen = precision or (facts.export_precision or "fp32" if backend == "onnxruntime" else "fp32")
    return EngineChoice(backend, chosen, capabilities.physical_cores, f"{backend} {chosen}: {why}.")


def machine_words(capabilities: Capabilities | None = None) -> str:
    """The CPU, its physical cores and the instruction sets that decide the bf16 and int8 rates, in one line."""
    capabilities = capabilities or Capabilities.detect()
    sets = " ".join(capabilities.instruction_sets) or "none of " + " ".join(BF16_INSTRUCTION_SETS)
    return f"{cpu_name()}, {capabilities.physical_cores} physical cores; instruction sets: {sets}"
