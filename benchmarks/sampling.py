"""Sampling speed on CPU, measured so that it can be trusted: every backend against stock diffusers, interleaved.

Backends (one process each: torch and onnxruntime in one process oversubscribe the cores):

- `diffusers-fp32`, `diffusers-bf16`: stock diffusers `DDPMPipeline`, in float32 and under bfloat16 autocast
  (the baselines: what a user of diffusers gets on this CPU);
- `paper-fp32`, `paper-bf16`: `DDPMPaperPipeline`, in float32 and in bfloat16 (autocast, or
  `torch_dtype=torch.bfloat16` with `--paper-bf16 dtype`, and with the UNet in channels-last memory format, as
  diffusers' CPU advice has it, with `--paper-bf16 dtype-channels-last`);
- `onnx-dynamo`, `onnx-torchscript`: `OnnxDDPMPipeline` on the float32 graphs of the two exporters;
- `onnx-int8`: `OnnxDDPMPipeline` on `ddpm export --quantize int8`'s graph;
- `onnx-threads1`: the dynamo graph on one onnxruntime thread;
- `openvino-fp32`, `openvino-bf16`: the dynamo graph on OpenVINO (`open_sampler(..., "openvino", precision=...)`),
  bf16 with float32 below t = `BF16_FLOAT32_BELOW_T` (`--bf16-float32-below-t` changes it for every bf16 row that
  runs through `open_sampler`);
- `pytorch-fp32`, `pytorch-bf16`: `open_sampler(..., "pytorch", precision=...)` (bf16: bf16 weights in channels-last);
- `default`: exactly what `ddpm sample` runs: `open_sampler` with no backend and no precision, for the case's batch
  size (`export.engine_choice.choose_engine`); its row says which engine and precision that was.

How the numbers are made trustworthy:

- All workers load first (cold start measured one at a time), then the timed runs go round-robin, A B C ... A B C
  ..., so a neighbour's burst or a clock change hits every backend alike instead of one backend's runs.
- At least 5 timed runs per backend; the table gives min / median / max ms per step and the spread
  (max - min) / median. A row whose spread exceeds 10% is flagged `NOISY`: do not draw conclusions from it.
- The roofline is measured in the same run, before and after the cases: torch's fp32 and bf16 matrix multiply
  and onnxruntime's int8 (u8 x s8 `MatMulInteger`) on the same threads, beside the CPU's instruction sets. Each
  row's achieved GFLOP/s (the UNet's FLOPs, counted by torch, per second) is set against the rate of its own
  precision. CPU time beside wall time says how much of the wall time the machine's neighbours took.

The digits cases use the bundled (trained) digits model and calibrate int8 on the digits; the cifar10 cases use
the paper's UNet with random weights (speed does not depend on training), calibrated on random images.
`--model DIR` (or `--model mnist`, the bundled MNIST model) times a pipeline folder instead, calibrated on its
training data. Quality per precision is
`benchmarks/precision_quality.py`'s job.

    python benchmarks/sampling.py              # about 20-40 minutes on 2 idle cores (three exports of cifar10)
    python benchmarks/sampling.py --quick      # smoke test: digits only, few steps
    python benchmarks/sampling.py --model mnist --batch-sizes 1,8 --steps 100
    python benchmarks/sampling.py --cases digits:1:1000,cifar10:8:100 --paper-bf16 dtype-channels-last \
        --backends diffusers-fp32,diffusers-bf16,paper-bf16,onnx-dynamo,openvino-bf16,default   # the goal rows

With a bf16 row that runs float32 below t = 10, a case's share of float32 steps is 1 / steps for up to 100 steps
(DDPM's leading spacing always samples t = 0): 100 steps give the 1% of a 1000-step run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ddpm_plugin.export.cpu import cpu_name, instruction_sets, physical_cpu_count
from ddpm_plugin.vocabulary import BF16_FLOAT32_BELOW_T

SPREAD_LIMIT = 0.10  # (max - min) / median above this flags a row
MIN_REPEATS = 5
# The network's precision of each backend; `default`'s is whatever `ddpm sample` chose, reported by its worker.
PRECISION = {"diffusers-fp32": "fp32", "diffusers-bf16": "bf16", "paper-fp32": "fp32", "paper-bf16": "bf16",
             "onnx-dynamo": "fp32", "onnx-torchscript": "fp32", "onnx-int8": "int8", "onnx-threads1": "fp32",
             "openvino-fp32": "fp32", "openvino-bf16": "bf16", "pytorch-fp32": "fp32", "pytorch-bf16": "bf16"}
BACKENDS = (*PRECISION, "default")
DEFAULT_BACKENDS = ("diffusers-fp32", "diffusers-bf16", "paper-fp32", "paper-bf16", "onnx-dynamo", "onnx-torchscript",
                    "onnx-int8", "openvino-fp32", "openvino-bf16", "default")
BASELINES = ("diffusers-fp32", "diffusers-bf16")
ONNX_FOLDERS = {"onnx-dynamo": "onnx", "onnx-torchscript": "onnx-torchscript", "onnx-int8": "onnx-int8"}
# The export each backend runs: the dynamo graph (`ddpm export`'s default) for the rest of the ONNX backends, and
# for `default`, which finds it in the pipeline folder as `ddpm sample` does.
EXPORT_OF = {**{backend: backend for backend in ONNX_FOLDERS}, "onnx-threads1": "onnx-dynamo",
             "openvino-fp32": "onnx-dynamo", "openvino-bf16": "onnx-dynamo", "default": "onnx-dynamo"}
MATMUL_SIZE = 2048
# The goals set for the CPU path: (model, batch size, backend, baseline, least speed-up, least share of its precision's
# matmul rate).
GOALS = (("cifar10", 8, "default", "diffusers-bf16", 1.6, 0.50), ("digits", 1, "default", "diffusers-fp32", 5.0, None))


@dataclass(frozen=True)
class Case:
    model: str  # a preset name, or a pipeline folder
    batch_size: int
    num_inference_steps: int


DEFAULT_CASES = (Case("digits", 1, 1000), Case("digits", 16, 1000), Case("cifar10", 1, 20), Case("cifar10", 8, 5))
QUICK_CASES = (Case("digits", 1, 50),)


def parse_cases(text: str) -> list[Case]:
    """`model:batch:steps` items, comma-separated (`--cases`)."""
    cases = []
    for item in filter(None, text.split(",")):
        model, _, rest = item.rpartition(":")
        model, _, batch = model.rpartition(":")
        if not (model and batch.isdigit() and rest.isdigit() and int(batch) > 0 and int(rest) > 0):
            raise ValueError(f"`--cases` items are model:batch:steps with positive integers, got {item!r}.")
        cases.append(Case(model, int(batch), int(rest)))
    return cases


def parse_backends(text: str) -> tuple[str, ...]:
    """Comma-separated backend names (`--backends`)."""
    backends = tuple(filter(None, text.split(",")))
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"`--backends` must name some of {list(BACKENDS)}, got {text!r}.")
    return backends


# --- Timings and their spread (unit-tested in tests/test_sampling_benchmark.py). ---


@dataclass(frozen=True)
class Timing:
    """min / median / max of repeated measurements, and whether they spread too far to be trusted."""

    minimum: float
    median: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Timing":
        if len(values) == 0:
            raise ValueError("a timing needs at least one measurement.")
        return cls(min(values), statistics.median(values), max(values))

    @property
    def spread(self) -> float:
        """(max - min) / median."""
        return (self.maximum - self.minimum) / self.median

    @property
    def noisy(self) -> bool:
        return self.spread > SPREAD_LIMIT

    def scaled(self, factor: float) -> "Timing":
        return Timing(self.minimum * factor, self.median * factor, self.maximum * factor)


def interleaved(backends: Sequence[str], repeats: int) -> list[str]:
    """The order of the timed runs: every backend once per round, `repeats` rounds (A B C A B C ...)."""
    return [backend for _ in range(repeats) for backend in backends]


# --- Workers: one backend in its own process, told over stdin when to run. ---


def load_sampler(backend: str, model: Path, batch_size: int, steps: int, threads: int, paper_bf16: str,
                 bf16_float32_below_t: int) -> tuple[Callable[[], None], dict]:
    """The timed function of `backend`, and what it runs (`engine`, `precision`)."""
    if backend == "default":
        # `ddpm sample`'s choice: fails here, by name, where the engine choice is missing.
        from ddpm_plugin.export.engine_choice import choose_engine
        from ddpm_plugin.export.sampler import open_sampler

        sampler = open_sampler(model, backend=None, precision=None, batch_size=batch_size, num_inference_steps=steps,
                               progress_bar=False)
        choice = choose_engine(model, batch_size)
        description = {"engine": f"{sampler.backend} on {choice.num_threads} thread{'s' * (choice.num_threads > 1)}",
                       "precision": sampler.precision, "reason": choice.reason}
        return lambda: sampler(0, batch_size), description
    if backend.startswith(("onnx", "openvino")):
        from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

        folder = model / ONNX_FOLDERS[EXPORT_OF[backend]]
        if backend.startswith("openvino"):
            precision = PRECISION[backend]
            pipe = OnnxDDPMPipeline.from_pretrained(folder, engine="openvino", precision=precision, num_threads=threads,
                                                    float32_below_t=bf16_float32_below_t if precision == "bf16" else None)
        else:
            pipe = OnnxDDPMPipeline.from_pretrained(folder, provider="cpu", num_threads=1 if backend == "onnx-threads1" else threads)
        description = {"engine": pipe.providers[0], "precision": PRECISION[backend]}
        return lambda: pipe(batch_size=batch_size, num_inference_steps=steps, seed=0, progress_bar=False), description

    import contextlib

    import torch

    torch.set_num_threads(threads)
    if backend.startswith("pytorch"):
        from ddpm_plugin.export.sampler import open_sampler

        sampler = open_sampler(model, "pytorch", precision=PRECISION[backend], num_inference_steps=steps, progress_bar=False)
        if PRECISION[backend] == "bf16":
            sampler.float32_below_t = bf16_float32_below_t
        return lambda: sampler(0, batch_size), {"engine": "pytorch", "precision": sampler.precision}
    if backend.startswith("diffusers"):
        from diffusers import DDPMPipeline as pipeline_class
    else:
        from ddpm_plugin import DDPMPaperPipeline as pipeline_class
    bf16 = PRECISION[backend] == "bf16"
    by_dtype = bf16 and backend.startswith("paper") and paper_bf16.startswith("dtype")
    pipe = pipeline_class.from_pretrained(model, **({"torch_dtype": torch.bfloat16} if by_dtype else {}))
    if by_dtype and paper_bf16 == "dtype-channels-last":
        pipe.unet.to(memory_format=torch.channels_last)  # oneDNN's bf16 convolutions run fastest on NHWC
    pipe.set_progress_bar_config(disable=True)
    autocast = bf16 and not by_dtype

    def sample() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            pipe(batch_size=batch_size, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="np")

    return sample, {"engine": "pytorch", "precision": PRECISION[backend]}


def run_worker(args: argparse.Namespace) -> None:
    sample, description = load_sampler(args.worker, Path(args.pipeline), args.batch_size, args.steps, args.threads,
                                       args.paper_bf16, args.bf16_float32_below_t)
    begin = time.perf_counter()
    sample()  # the cold run: first-call allocations, oneDNN primitive creation, ORT's arena
    first_run = time.perf_counter() - begin
    reply({"cold_start_s": time.time() - args.process_started, "first_run_s": first_run, **description})
    for command in sys.stdin:
        if command.strip() != "run":
            break
        begin, cpu_begin = time.perf_counter(), time.process_time()
        sample()
        reply({"wall_s": time.perf_counter() - begin, "cpu_s": time.process_time() - cpu_begin})
    reply({"peak_rss_mib": peak_rss_mib()})


def reply(message: dict) -> None:
    print(json.dumps(message), flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory (/proc's VmHWM belongs to this address space, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Worker:
    """A worker process; `run()` times one sampling run in it."""

    def __init__(self, backend: str, arguments: list[str]) -> None:
        self.backend = backend
        command = [sys.executable, __file__, "--worker", backend, *arguments, "--process-started", repr(time.time())]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started = self.receive()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.backend} worker died:\n{self.process.stderr.read()[-3000:]}")
        return json.loads(line)

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> dict:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        final = self.receive()
        self.process.wait()
        return final


# --- The roofline: fp32, bf16 and int8 matrix multiply on the same threads. ---


def run_roofline_worker(args: argparse.Namespace) -> None:
    """Best of 5 products of two n x n matrices (2 n^3 operations) per precision, in GFLOP/s (GOP/s for int8)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from ddpm_plugin.export.providers import session_options

    torch.set_num_threads(args.threads)
    n, rates = MATMUL_SIZE, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rates[name] = best_rate(lambda: torch.mm(a, b), 2 * n**3)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8_matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]), helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), session_options(args.threads), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    rates["int8"] = best_rate(lambda: session.run(None, feeds), 2 * n**3)
    reply({**rates, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "onnxruntime": ort.__version__,
           "onnx": onnx.__version__})


def best_rate(function: Callable[[], object], operations: float) -> float:
    function()
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - begin)
    return operations / best / 1e9


# --- Parent: models, exports, the interleaved runs, the table. ---


def prepare_model(model: str, folder: Path, int8_budget: float | None, keep_float: tuple[str, ...] | None = None,
                  exports: Sequence[str] = tuple(ONNX_FOLDERS)) -> tuple[Path, float]:
    """The pipeline folder of `model` with the `exports` (`ONNX_FOLDERS` keys), and the UNet's GFLOP per image per step."""
    import numpy as np
    import torch

    from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.export.onnx_export import export_onnx, unet_gflop_per_image
    from ddpm_plugin.export.quantize import Int8Settings

    calibration_data = None
    if model in ("digits", "mnist") or Path(model).is_dir():  # the bundled (trained) models, or a folder
        source = resolve_model(model)
    else:  # a preset with random weights, calibrated on random images
        torch.manual_seed(0)
        source = folder / model
        pipe = DDPMPaperPipeline(unet=PaperUNet2DModel.from_preset(model).eval(), scheduler=paper_scheduler(model))
        pipe.save_pretrained(source)
        shape = (pipe.unet.config.sample_size,) * 2 + (pipe.unet.config.in_channels,)
        calibration_data = str(folder / f"{model}-random-images.npz")
        np.savez(calibration_data, images=np.random.default_rng(0).integers(0, 256, (64, *shape), dtype=np.uint8))
    path = folder / f"{Path(model).name}-exports"
    path.mkdir()
    for item in ("unet", "scheduler", "model_index.json"):  # the exports live beside a copy of the pipeline
        (shutil.copytree if (source / item).is_dir() else shutil.copy2)(source / item, path / item)  # links are refused
    int8 = Int8Settings(calibration_data=calibration_data, **({} if int8_budget is None else {"budget": int8_budget}),
                        **({} if keep_float is None else {"keep_float": keep_float}))
    if calibration_data is None and (source / "training_config.json").is_file():
        shutil.copy2(source / "training_config.json", path / "training_config.json")
    for backend in exports:
        report = export_onnx(
            path, path / ONNX_FOLDERS[backend], seed=0, exporter="torchscript" if backend == "onnx-torchscript" else "dynamo",
            quantize=int8 if backend == "onnx-int8" else None,
        )
        quality = f", eps error (Eq. 12) {report.quality['bound_rise']:+.2%}" if report.quality else ""
        print(f"# {model}: {backend} exported in {report.export_seconds:.0f} s{quality}", flush=True)
    return path, unet_gflop_per_image(DDPMPaperPipeline.from_pretrained(path).unet)


def measure_case(case: Case, model: Path, threads: int, repeats: int, paper_bf16: str, backends: Sequence[str],
                 bf16_float32_below_t: int = BF16_FLOAT32_BELOW_T) -> dict[str, dict]:
    """Each backend's timings of `case`: workers loaded one at a time, then `repeats` interleaved rounds."""
    arguments = ["--pipeline", str(model), "--batch-size", str(case.batch_size), "--steps", str(case.num_inference_steps),
                 "--threads", str(threads), "--paper-bf16", paper_bf16, "--bf16-float32-below-t", str(bf16_float32_below_t)]
    workers = {backend: Worker(backend, arguments) for backend in backends}  # loaded one at a time
    runs: dict[str, list[dict]] = {backend: [] for backend in backends}
    try:
        for backend in interleaved(backends, repeats):
            runs[backend].append(workers[backend].run())
    finally:
        finals = {backend: worker.close() for backend, worker in workers.items()}
    return {
        backend: {
            "wall": Timing.of([run["wall_s"] for run in runs[backend]]),
            "cpu": Timing.of([run["cpu_s"] for run in runs[backend]]),
            **workers[backend].started, **finals[backend],
        }
        for backend in backends
    }


def rate_precision(backend: str, result: dict) -> str:
    """The matmul rate a row is set against: its precision's (`default`: the one it ran, e.g. "bf16, float32 below
    t=10" is bf16's)."""
    return PRECISION.get(backend) or str(result["precision"]).split(",")[0]


def achieved(case: Case, backend: str, results: dict[str, dict], gflop_per_image_step: float,
             roofline: dict[str, Timing]) -> dict:
    """One row's numbers: median ms/step, speed-up over each baseline run in the case, GFLOP/s and its share of the
    same-precision matmul rate."""
    result = results[backend]
    wall = result["wall"]
    rate = gflop_per_image_step * case.batch_size * case.num_inference_steps / wall.median
    precision = rate_precision(backend, result)
    return {
        "ms_per_step": wall.median * 1000 / case.num_inference_steps,
        "speedups": {baseline: results[baseline]["wall"].median / wall.median for baseline in BASELINES if baseline in results},
        "gflops": rate, "precision": precision, "share": rate / roofline[precision].median,
    }


def table_rows(case: Case, results: dict[str, dict], gflop_per_image_step: float, roofline: dict[str, Timing]) -> list[list[str]]:
    rows = []
    per_step = 1000 / case.num_inference_steps
    for backend, result in results.items():
        wall, cpu = result["wall"], result["cpu"]
        numbers = achieved(case, backend, results, gflop_per_image_step, roofline)
        speedups = [f"{numbers['speedups'][baseline]:.2f}x" if baseline in numbers["speedups"] else "-" for baseline in BASELINES]
        step = wall.scaled(per_step)
        name = f"{backend} ({result['engine']}, {result['precision']})" if backend == "default" else backend
        rows.append([
            Path(case.model).name, str(case.batch_size), str(case.num_inference_steps), name,
            f"{step.minimum:.2f} / {step.median:.2f} / {step.maximum:.2f}", f"{wall.spread:.0%}" + (" NOISY" if wall.noisy else ""),
            f"{cpu.median * per_step:.2f}", *speedups,
            f"{numbers['gflops']:.0f} ({numbers['share']:.0%} of {numbers['precision']})",
            f"{result['cold_start_s']:.1f}", f"{result['peak_rss_mib']:.0f}",
        ])
    return rows


def goal_lines(measured: list[tuple[Case, dict[str, dict], float]], roofline: dict[str, Timing]) -> list[str]:
    """The `GOALS` each measured case meets or misses."""
    lines = []
    for model, batch_size, backend, baseline, least_speedup, least_share in GOALS:
        for case, results, gflop in measured:
            if Path(case.model).name != model or case.batch_size != batch_size or not {backend, baseline} <= set(results):
                continue
            numbers = achieved(case, backend, results, gflop, roofline)
            speedup = numbers["speedups"][baseline]
            text = (f"{model} at batch {batch_size}, {case.num_inference_steps} steps, {backend} "
                    f"({results[backend]['engine']}, {results[backend]['precision']}): {speedup:.2f}x {baseline} "
                    f"(goal >= {least_speedup}x: {'met' if speedup >= least_speedup else 'NOT met'})")
            if least_share is not None:
                share = numbers["share"]
                text += (f", {share:.0%} of the {numbers['precision']} matmul rate "
                         f"(goal >= {least_share:.0%}: {'met' if share >= least_share else 'NOT met'})")
            lines.append(text)
    return lines


def spawn_roofline(threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", "roofline", "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the roofline worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def roofline_of(before: dict, after: dict) -> dict[str, Timing]:
    """The matmul rates measured before and after the cases; rows use their mean as the peak."""
    return {name: Timing.of([before[name], after[name]]) for name in ("fp32", "bf16", "int8")}


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options a worker process reads (hidden), shared with the scripts that reuse these workers."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-started", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--bf16-float32-below-t", type=int, default=BF16_FLOAT32_BELOW_T,
                        help="the t below which the bf16 rows of open_sampler's backends run float32 (default: the samplers')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: the digits case at batch 1, 50 steps")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help=f"timed runs per backend (at least {MIN_REPEATS})")
    parser.add_argument("--threads", type=int, default=None, help="threads per backend (default: physical cores)")
    parser.add_argument("--model", action="append", default=[],
                        help="also time this pipeline folder (repeatable); with --model only, the default cases are skipped")
    parser.add_argument("--batch-sizes", default="1", help="batch sizes for --model cases, comma-separated")
    parser.add_argument("--steps", type=int, default=100, help="sampling steps for --model cases")
    parser.add_argument("--cases", default=None, help="the cases instead, as model:batch:steps, comma-separated")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help=f"backends to time, comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--paper-bf16", choices=("autocast", "dtype", "dtype-channels-last"), default="autocast",
                        help="how paper-bf16 runs: torch.autocast, from_pretrained(torch_dtype=torch.bfloat16), or "
                             "that with the UNet in channels-last memory format")
    parser.add_argument("--int8-keep-float", default=None,
                        help="layer groups the int8 exports keep in float32, comma-separated (default: ddpm export's)")
    parser.add_argument("--int8-budget", type=float, default=None,
                        help="quality budget of the int8 exports of trained models (default: ddpm export's)")
    parser.add_argument("--output", default=None, help="also write the report (markdown) to this file")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker == "roofline":
        return run_roofline_worker(args)
    if args.worker:
        return run_worker(args)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be at least {MIN_REPEATS}, got {args.repeats}")
    try:
        backends = parse_backends(args.backends)
        cases = parse_cases(args.cases) if args.cases else []
    except ValueError as error:
        parser.error(str(error))

    threads = args.threads or physical_cpu_count()
    if not cases:
        cases = [Case(model, int(size), args.steps) for model in args.model for size in args.batch_sizes.split(",")]
    if not cases:
        cases = list(QUICK_CASES if args.quick else DEFAULT_CASES)
    load_before = os.getloadavg()[0]
    before = spawn_roofline(threads)
    measured = []
    with tempfile.TemporaryDirectory() as scratch:
        models = {}
        exports = list(dict.fromkeys(EXPORT_OF[backend] for backend in backends if backend in EXPORT_OF))
        for name in dict.fromkeys(case.model for case in cases):
            # Random-weight presets need no quality budget: their int8 graphs are only timed.
            budget = args.int8_budget if name in ("digits", "mnist") or Path(name).is_dir() else 1.0
            keep_float = None if args.int8_keep_float is None else tuple(filter(None, args.int8_keep_float.split(",")))
            models[name] = prepare_model(name, Path(scratch), budget, keep_float, exports)
        after = spawn_roofline(threads)
        roofline = roofline_of(before, after)
        for case in cases:
            path, gflop = models[case.model]
            results = measure_case(case, path, threads, args.repeats, args.paper_bf16, backends, args.bf16_float32_below_t)
            for backend, result in results.items():
                step = result["wall"].scaled(1000 / case.num_inference_steps)
                print(f"# {case} {backend}: {step.minimum:.2f} / {step.median:.2f} / {step.maximum:.2f} ms/step", flush=True)
            measured.append((case, results, gflop))
    rows = [row for case, results, gflop in measured for row in table_rows(case, results, gflop, roofline)]
    report = report_lines(rows, threads, before, roofline, args, load_before, goal_lines(measured, roofline))
    reasons = {f"{Path(case.model).name} batch {case.batch_size}": results["default"]["reason"]
               for case, results, _ in measured if "default" in results}
    report += [""] + [f"`default` at {case}: {reason}" for case, reason in reasons.items()]
    print("\n".join(report))
    if args.output:
        Path(args.output).write_text("\n".join(report) + "\n")


def report_lines(rows: list[list[str]], threads: int, machine: dict, roofline: dict[str, Timing], args: argparse.Namespace,
                 load_before: float, goals: list[str]) -> list[str]:
    noisy = sum("NOISY" in row[5] for row in rows)
    lines = [
        "",
        f"CPU: {cpu_name()}, {physical_cpu_count()} physical cores, {threads} threads per backend; instruction sets: "
        f"{' '.join(instruction_sets()) or 'unknown'}; torch CPU capability {machine['torch_cpu_capability']}, "
        f"onnxruntime {machine['onnxruntime']}; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        f"Roofline ({MATMUL_SIZE}^3 matrix multiply, {threads} threads, before and after the cases): "
        + "; ".join(f"{name} {timing.minimum:.0f}-{timing.maximum:.0f} G{'OP' if name == 'int8' else 'FLOP'}/s"
                    for name, timing in roofline.items())
        + " (fp32, bf16: torch; int8: onnxruntime MatMulInteger u8 x s8). Each row's UNet GFLOP/s is set against the "
          "mean rate of its own precision (bf16 rows: the bf16 rate, float32 steps below t included).",
        f"{args.repeats} timed runs per backend, interleaved; spread = (max - min) / median, NOISY above "
        f"{SPREAD_LIMIT:.0%} ({noisy} of {len(rows)} rows); paper-bf16 by {args.paper_bf16}; bf16 rows of open_sampler's "
        f"backends run float32 below t = {args.bf16_float32_below_t}.",
        "",
        "| model | batch | steps | backend | ms/step min / median / max | spread | CPU ms/step | vs diffusers fp32 | "
        "vs diffusers bf16 autocast | UNet GFLOP/s (share of same-precision matmul) | cold start (s) | peak RSS (MiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if goals:
        lines += ["", "Goals:", *(f"- {goal}" for goal in goals)]
    return lines


if __name__ == "__main__":
    main()
