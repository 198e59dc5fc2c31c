"""Sampling speed on CPU: stock diffusers `DDPMPipeline` vs `DDPMPaperPipeline` vs `OnnxDDPMPipeline`.

Every backend runs in its own process (torch and onnxruntime in one process oversubscribe the cores), on the
same randomly initialised weights (speed does not depend on training), with the same number of threads (one
per physical core). For each case it reports the median time of a full sampling run, the speed-up over stock
diffusers, the cold start (process start to the first image, imports and loading included), the peak
resident memory and, for cifar10, the achieved GFLOP/s of the UNet (12.1 GFLOP per image per step) against
this CPU's fp32 matrix-multiply rate, measured in the same run.

It also reports each run's CPU time: on a machine whose cores are shared, wall times (and multi-threaded
runs above all) measure the neighbours as much as the code; with `--threads 1` the CPU time still measures
the work done.

    python benchmarks/sampling.py              # about 5-10 minutes on 2 idle cores
    python benchmarks/sampling.py --threads 1  # on shared cores
    python benchmarks/sampling.py --quick      # digits and cifar10 at batch 1 only, fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CIFAR10_GFLOP_PER_IMAGE_STEP = 12.1  # forward pass of the paper's 35.7M-parameter UNet at 32x32
BACKENDS = ("diffusers", "paper", "onnx")
BACKEND_NAMES = {
    "diffusers": "diffusers DDPMPipeline (PyTorch eager)",
    "paper": "DDPMPaperPipeline (PyTorch eager)",
    "onnx": "OnnxDDPMPipeline (onnxruntime)",
}


@dataclass(frozen=True)
class Case:
    preset: str
    batch_size: int
    num_inference_steps: int


DEFAULT_CASES = (Case("digits", 1, 1000), Case("digits", 16, 1000), Case("cifar10", 1, 20), Case("cifar10", 8, 5))
QUICK_CASES = (Case("digits", 1, 200), Case("cifar10", 1, 5))


# --- Worker: one backend, one case, in a fresh process. ---


def run_worker(args: argparse.Namespace) -> None:
    started = args.process_started
    if args.backend == "onnx":
        from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

        pipe = OnnxDDPMPipeline.from_pretrained(Path(args.model) / "onnx", provider="cpu", num_threads=args.threads)

        def sample() -> None:
            pipe(batch_size=args.batch_size, num_inference_steps=args.steps, seed=0, progress_bar=False)

    else:
        import torch

        torch.set_num_threads(args.threads)
        if args.backend == "diffusers":
            from diffusers import DDPMPipeline as pipeline_class
        else:
            from ddpm_plugin import DDPMPaperPipeline as pipeline_class
        pipe = pipeline_class.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)

        def sample() -> None:
            pipe(batch_size=args.batch_size, num_inference_steps=args.steps, generator=torch.manual_seed(0), output_type="np")

    times, cpu_times = [], []
    for repeat in range(args.repeats + 1):
        begin, cpu_begin = time.perf_counter(), time.process_time()
        sample()
        times.append(time.perf_counter() - begin)
        cpu_times.append(time.process_time() - cpu_begin)
        if repeat == 0:
            cold_start = time.time() - started
    result = {
        "cold_start_s": cold_start,
        "startup_s": cold_start - times[0],
        "times_s": times[1:],
        "cpu_times_s": cpu_times[1:],
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(result))


def peak_rss_mib() -> float:
    """This process's peak resident memory. (getrusage's ru_maxrss survives execve, so a child started by a
    big parent would report the parent's peak; /proc's VmHWM belongs to the new address space.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_matmul_worker(args: argparse.Namespace) -> None:
    """Best fp32 GEMM rate of torch (oneDNN/MKL) on `threads` threads: 2n^3 FLOP per n x n product."""
    import torch

    torch.set_num_threads(args.threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    print(json.dumps({"gflops": 2 * n**3 / best / 1e9}))


def _timed(function) -> float:
    begin = time.perf_counter()
    function()
    return time.perf_counter() - begin


# --- Parent: weights, subprocesses, the table. ---
# CPU time is shown beside wall time because the cores may be shared: with one thread per backend it measures
# the work done, whatever else runs on the machine.


def spawn(*arguments: str) -> dict:
    command = [sys.executable, __file__, *arguments, "--process-started", repr(time.time())]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare_weights(preset: str, folder: Path) -> Path:
    """A randomly initialised pipeline of `preset`, saved with its ONNX export in `onnx/`."""
    import torch

    from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler
    from ddpm_plugin.export.onnx_export import export_onnx

    torch.manual_seed(0)
    path = folder / preset
    pipe = DDPMPaperPipeline(unet=PaperUNet2DModel.from_preset(preset).eval(), scheduler=paper_scheduler(preset))
    pipe.save_pretrained(path)
    report = export_onnx(path, path / "onnx", seed=0)
    print(f"# {preset}: exported in {report.export_seconds:.1f} s, max abs error {report.max_abs_error:.1e}", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small cases only")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case after the cold one")
    parser.add_argument("--threads", type=int, default=None, help="threads per backend (default: physical cores)")
    parser.add_argument("--worker", choices=(*BACKENDS, "matmul"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "matmul":
        return run_matmul_worker(args)
    if args.worker:
        args.backend = args.worker
        return run_worker(args)

    from ddpm_plugin.export.providers import physical_cpu_count

    threads = args.threads or physical_cpu_count()
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    matmul = spawn("--worker", "matmul", "--threads", str(threads))["gflops"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        weights = {preset: prepare_weights(preset, Path(scratch)) for preset in dict.fromkeys(c.preset for c in cases)}
        for case in cases:
            results = {}
            for backend in BACKENDS:
                results[backend] = spawn(
                    "--worker", backend, "--model", str(weights[case.preset]), "--batch-size", str(case.batch_size),
                    "--steps", str(case.num_inference_steps), "--repeats", str(args.repeats), "--threads", str(threads),
                )
                print(f"# {case} {backend}: {results[backend]}", flush=True)
            rows.extend(table_rows(case, results, matmul))
    load = os.getloadavg()[0]
    print()
    print(f"CPU: {physical_cpu_count()} physical cores, {threads} threads per backend, fp32 matmul (torch, 2048^3) "
          f"{matmul:.0f} GFLOP/s; load average at the end {load:.1f}; random weights; medians of {args.repeats} runs.")
    print()
    print("| model | batch | steps | backend | wall (s) | ms/step | CPU time (s) | speed-up vs diffusers: wall (CPU time) | cold start (s) | of which imports + loading (s) | peak RSS (MiB) | UNet GFLOP/s (% of matmul) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def table_rows(case: Case, results: dict[str, dict], matmul_gflops: float) -> list[list[str]]:
    baseline = statistics.median(results["diffusers"]["times_s"])
    cpu_baseline = statistics.median(results["diffusers"]["cpu_times_s"])
    rows = []
    for backend, result in results.items():
        median, cpu_median = statistics.median(result["times_s"]), statistics.median(result["cpu_times_s"])
        gflops = "-"
        if case.preset == "cifar10":
            rate = CIFAR10_GFLOP_PER_IMAGE_STEP * case.batch_size * case.num_inference_steps / median
            gflops = f"{rate:.0f} ({100 * rate / matmul_gflops:.0f}%)"
        rows.append([
            case.preset, str(case.batch_size), str(case.num_inference_steps), BACKEND_NAMES[backend],
            f"{median:.2f}", f"{1000 * median / case.num_inference_steps:.1f}", f"{cpu_median:.2f}",
            f"{baseline / median:.2f}x ({cpu_baseline / cpu_median:.2f}x)",
            f"{result['cold_start_s']:.1f}", f"{result['startup_s']:.1f}", f"{result['peak_rss_mib']:.0f}", gflops,
        ])
    return rows


if __name__ == "__main__":
    main()
