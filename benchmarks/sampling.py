"""Sampling speed on CPU, measured so that it can be trusted: every backend against stock diffusers, interleaved.

Backends (one process each: torch and onnxruntime in one process oversubscribe the cores):

- `diffusers-fp32`, `diffusers-bf16`: stock diffusers `DDPMPipeline`, in float32 and under bfloat16 autocast
  (the baselines: what a user of diffusers gets on this CPU);
- `paper-fp32`, `paper-bf16`: `DDPMPaperPipeline`, in float32 and in bfloat16 (autocast, or
  `torch_dtype=torch.bfloat16` with `--paper-bf16 dtype`, and with the UNet in channels-last memory format, as
  diffusers' CPU advice has it, with `--paper-bf16 dtype-channels-last`);
- `onnx-dynamo`, `onnx-torchscript`: `OnnxDDPMPipeline` on the float32 graphs of the two exporters;
- `onnx-int8`: `OnnxDDPMPipeline` on `ddpm export --quantize int8`'s graph;

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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

SPREAD_LIMIT = 0.10  # (max - min) / median above this flags a row
MIN_REPEATS = 5
BACKENDS = ("diffusers-fp32", "diffusers-bf16", "paper-fp32", "paper-bf16", "onnx-dynamo", "onnx-torchscript", "onnx-int8")
PRECISION = {"diffusers-fp32": "fp32", "diffusers-bf16": "bf16", "paper-fp32": "fp32", "paper-bf16": "bf16",
             "onnx-dynamo": "fp32", "onnx-torchscript": "fp32", "onnx-int8": "int8"}
BASELINES = ("diffusers-fp32", "diffusers-bf16")
ONNX_FOLDERS = {"onnx-dynamo": "onnx", "onnx-torchscript": "onnx-torchscript", "onnx-int8": "onnx-int8"}
# Instruction sets that decide which kernels run: AVX-512 and AMX carry the bf16 and int8 rates.
INSTRUCTION_SETS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
                    "amx_tile", "amx_bf16", "amx_int8")
MATMUL_SIZE = 2048


@dataclass(frozen=True)
class Case:
    model: str  # a preset name, or a pipeline folder
    batch_size: int
    num_inference_steps: int


DEFAULT_CASES = (Case("digits", 1, 1000), Case("digits", 16, 1000), Case("cifar10", 1, 20), Case("cifar10", 8, 5))
QUICK_CASES = (Case("digits", 1, 50),)


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


# --- The machine. ---


def instruction_sets() -> list[str]:
    """The `INSTRUCTION_SETS` this CPU reports in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [name for name in INSTRUCTION_SETS if name in flags]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- Workers: one backend in its own process, told over stdin when to run. ---


def load_sampler(backend: str, model: Path, batch_size: int, steps: int, threads: int, paper_bf16: str) -> Callable[[], None]:
    if backend.startswith("onnx"):
        from ddpm_plugin.export.sampler import open_sampler

        pipe = open_sampler(model / ONNX_FOLDERS[backend], "onnxruntime", num_threads=threads, progress_bar=False).pipe
        return lambda: pipe(batch_size=batch_size, num_inference_steps=steps, seed=0, progress_bar=False)

    import contextlib

    import torch

    torch.set_num_threads(threads)
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

    return sample


def run_worker(args: argparse.Namespace) -> None:
    sample = load_sampler(args.worker, Path(args.pipeline), args.batch_size, args.steps, args.threads, args.paper_bf16)
    begin = time.perf_counter()
    sample()  # the cold run: first-call allocations, oneDNN primitive creation, ORT's arena
    first_run = time.perf_counter() - begin
    reply({"cold_start_s": time.time() - args.process_started, "first_run_s": first_run})
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


def prepare_model(model: str, folder: Path, int8_budget: float | None, keep_float: tuple[str, ...] | None = None) -> tuple[Path, float]:
    """The pipeline folder of `model` with its three exports, and the UNet's GFLOP per image per step."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.export.onnx_export import export_onnx
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
        target = path / item
        target.symlink_to((source / item).resolve(), target_is_directory=(source / item).is_dir())
    int8 = Int8Settings(calibration_data=calibration_data, **({} if int8_budget is None else {"budget": int8_budget}),
                        **({} if keep_float is None else {"keep_float": keep_float}))
    if calibration_data is None and (source / "training_config.json").is_file():
        (path / "training_config.json").symlink_to((source / "training_config.json").resolve())
    for backend, folder_name in ONNX_FOLDERS.items():
        report = export_onnx(
            path, path / folder_name, seed=0, exporter="torchscript" if backend == "onnx-torchscript" else "dynamo",
            quantize=int8 if backend == "onnx-int8" else None,
        )
        quality = f", eps error (Eq. 12) {report.quality['bound_rise']:+.2%}" if report.quality else ""
        print(f"# {model}: {backend} exported in {report.export_seconds:.0f} s{quality}", flush=True)
    unet = DDPMPaperPipeline.from_pretrained(path).unet
    config = unet.config
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, config.in_channels, config.sample_size, config.sample_size), torch.tensor([500]))
    return path, counter.get_total_flops() / 1e9


def measure_case(case: Case, model: Path, threads: int, repeats: int, paper_bf16: str, backends: Sequence[str]) -> dict[str, dict]:
    arguments = ["--pipeline", str(model), "--batch-size", str(case.batch_size), "--steps", str(case.num_inference_steps),
                 "--threads", str(threads), "--paper-bf16", paper_bf16]
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


def table_rows(case: Case, results: dict[str, dict], gflop_per_image_step: float, roofline: dict[str, Timing]) -> list[list[str]]:
    rows = []
    per_step = 1000 / case.num_inference_steps
    for backend, result in results.items():
        wall, cpu = result["wall"], result["cpu"]
        speedups = [f"{results[baseline]['wall'].median / wall.median:.2f}x" for baseline in BASELINES]
        rate = gflop_per_image_step * case.batch_size * case.num_inference_steps / wall.median
        precision = PRECISION[backend]
        peak = roofline[precision].median
        step = wall.scaled(per_step)
        rows.append([
            Path(case.model).name, str(case.batch_size), str(case.num_inference_steps), backend,
            f"{step.minimum:.2f} / {step.median:.2f} / {step.maximum:.2f}", f"{wall.spread:.0%}" + (" NOISY" if wall.noisy else ""),
            f"{cpu.median * per_step:.2f}", *speedups, f"{rate:.0f} ({rate / peak:.0%} of {precision})",
            f"{result['cold_start_s']:.1f}", f"{result['peak_rss_mib']:.0f}",
        ])
    return rows


def spawn_roofline(threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", "roofline", "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the roofline worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: the digits case at batch 1, 50 steps")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help=f"timed runs per backend (at least {MIN_REPEATS})")
    parser.add_argument("--threads", type=int, default=None, help="threads per backend (default: physical cores)")
    parser.add_argument("--model", action="append", default=[],
                        help="also time this pipeline folder (repeatable); with --model only, the default cases are skipped")
    parser.add_argument("--batch-sizes", default="1", help="batch sizes for --model cases, comma-separated")
    parser.add_argument("--steps", type=int, default=100, help="sampling steps for --model cases")
    parser.add_argument("--paper-bf16", choices=("autocast", "dtype", "dtype-channels-last"), default="autocast",
                        help="how paper-bf16 runs: torch.autocast, from_pretrained(torch_dtype=torch.bfloat16), or "
                             "that with the UNet in channels-last memory format")
    parser.add_argument("--int8-keep-float", default=None,
                        help="layer groups the int8 exports keep in float32, comma-separated (default: ddpm export's)")
    parser.add_argument("--int8-budget", type=float, default=None,
                        help="quality budget of the int8 exports of trained models (default: ddpm export's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "roofline":
        return run_roofline_worker(args)
    if args.worker:
        return run_worker(args)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be at least {MIN_REPEATS}, got {args.repeats}")

    from ddpm_plugin.export.providers import physical_cpu_count

    threads = args.threads or physical_cpu_count()
    cases = [Case(model, int(size), args.steps) for model in args.model for size in args.batch_sizes.split(",")]
    if not args.model:
        cases = list(QUICK_CASES if args.quick else DEFAULT_CASES)
    before = spawn_roofline(threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        models = {}
        for name in dict.fromkeys(case.model for case in cases):
            # Random-weight presets need no quality budget: their int8 graphs are only timed.
            budget = args.int8_budget if name in ("digits", "mnist") or Path(name).is_dir() else 1.0
            keep_float = None if args.int8_keep_float is None else tuple(filter(None, args.int8_keep_float.split(",")))
            models[name] = prepare_model(name, Path(scratch), budget, keep_float)
        after = spawn_roofline(threads)
        roofline = {name: Timing.of([before[name], after[name]]) for name in ("fp32", "bf16", "int8")}
        # GFLOP/s is a rate, so the roofline's "median" of two is their mean; rows use it as the peak.
        for case in cases:
            path, gflop = models[case.model]
            results = measure_case(case, path, threads, args.repeats, args.paper_bf16, BACKENDS)
            for backend, result in results.items():
                step = result["wall"].scaled(1000 / case.num_inference_steps)
                print(f"# {case} {backend}: {step.minimum:.2f} / {step.median:.2f} / {step.maximum:.2f} ms/step", flush=True)
            rows.extend(table_rows(case, results, gflop, roofline))
    print_report(rows, threads, before, roofline, args)


def print_report(rows: list[list[str]], threads: int, machine: dict, roofline: dict[str, Timing], args: argparse.Namespace) -> None:
    from ddpm_plugin.export.providers import physical_cpu_count

    noisy = sum("NOISY" in row[5] for row in rows)
    print()
    print(f"CPU: {cpu_name()}, {physical_cpu_count()} physical cores, {threads} threads per backend; instruction sets: "
          f"{' '.join(instruction_sets()) or 'unknown'}; torch CPU capability {machine['torch_cpu_capability']}, "
          f"onnxruntime {machine['onnxruntime']}; load average at the end {os.getloadavg()[0]:.1f}.")
    print(f"Roofline ({MATMUL_SIZE}^3 matrix multiply, {threads} threads, before and after the cases): "
          + "; ".join(f"{name} {timing.minimum:.0f}-{timing.maximum:.0f} G{'OP' if name == 'int8' else 'FLOP'}/s"
                      for name, timing in roofline.items())
          + " (fp32, bf16: torch; int8: onnxruntime MatMulInteger u8 x s8).")
    print(f"{args.repeats} timed runs per backend, interleaved; spread = (max - min) / median, NOISY above "
          f"{SPREAD_LIMIT:.0%} ({noisy} of {len(rows)} rows); paper-bf16 by {args.paper_bf16}.")
    print()
    print("| model | batch | steps | backend | ms/step min / median / max | spread | CPU ms/step | vs diffusers fp32 | "
          "vs diffusers bf16 autocast | UNet GFLOP/s (of same-precision matmul) | cold start (s) | peak RSS (MiB) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
