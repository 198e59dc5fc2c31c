"""`OnnxDDPMPipeline` on CUDA against PyTorch on the same GPU, in one run, in one table.

Rows: ONNX Runtime's CUDA provider with plain `session.run` (NumPy feeds every step), with IO binding, and with IO
binding + CUDA graphs (one graph per batch size), for the float32 and float16 exports; PyTorch's `DDPMPaperPipeline`
eager in float32, and with bfloat16 weights under `torch.compile(mode="reduce-overhead")`. Columns: ms per DDPM step
at each batch size, and each row's samples against PyTorch float32 on the GPU (DDIM, eta 0, same x_T). Then the
paper's 256 samples x 1000 steps end to end, from the fastest ONNX Runtime row and from PyTorch bf16 + compile.
The network is the `--preset` UNet with random weights (speed does not depend on training) unless `--model DIR`.

Needs an NVIDIA GPU and onnxruntime-gpu (1.20-1.26 on CUDA 12, >= 1.28 on CUDA 13); without a CUDA device it says
so and runs nothing. A cell that would start after `--budget-s` is left out, so the run ends in time on a lent
machine. `scripts/gpu_onnx_cuda.sh run` installs onnxruntime-gpu where nothing can be fetched and runs this with
`--output docs/results/onnx_cuda.md`.

    python benchmarks/onnx_cuda.py                          # cifar10, batch 1 8 128 256, 20 steps, 256 x 1000
    python benchmarks/onnx_cuda.py --batch-sizes 8 --steps 10 --end-to-end-steps 0
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# torch before onnxruntime: its CUDA libraries are then loaded when onnxruntime's CUDA provider looks for them.
import torch

import numpy as np

PARITY_BATCH, PARITY_STEPS = 8, 20


@dataclass
class Row:
    engine: str  # "onnxruntime fp32", "PyTorch"
    mode: str
    load: Callable[[], Any]  # -> a sampler with .sample(batch_size, steps) and .ddim(latents)


class OrtSampler:
    def __init__(self, export: Path, cuda_graph: bool, bound: bool, device: str = "cuda") -> None:
        from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

        self.pipe = OnnxDDPMPipeline.from_pretrained(export, provider=device, cuda_graph=cuda_graph)
        if not bound:
            plain: dict[int, PlainUNet] = {}
            self.pipe.bound_unet = lambda b: plain.setdefault(b, PlainUNet(self.pipe.session, (b, *self.pipe.image_shape)))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.pipe.image_shape

    def sample(self, batch_size: int, steps: int) -> None:
        self.pipe(batch_size=batch_size, num_inference_steps=steps, seed=0, progress_bar=False)

    def ddim(self, latents: np.ndarray) -> np.ndarray:
        return self.pipe(batch_size=len(latents), latents=latents, scheduler="ddim", num_inference_steps=PARITY_STEPS,
                         progress_bar=False).images


class TorchSampler:
    def __init__(self, folder: Path, dtype: torch.dtype, compile: bool, device: str = "cuda") -> None:
        from ddpm_plugin import DDPMPaperPipeline

        self.device = device
        self.pipe = DDPMPaperPipeline.from_pretrained(folder).to(device)
        if dtype != torch.float32:
            self.pipe.unet.to(dtype)
        if compile:
            self.pipe.unet.forward = torch.compile(self.pipe.unet.forward, mode="reduce-overhead", fullgraph=True)
        self.pipe.set_progress_bar_config(disable=True)

    @property
    def image_shape(self) -> tuple[int, ...]:
        config = self.pipe.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)

    @torch.no_grad()
    def sample(self, batch_size: int, steps: int) -> None:
        self.pipe(batch_size=batch_size, num_inference_steps=steps, generator=torch.Generator(self.device).manual_seed(0), output_type="np")

    @torch.no_grad()
    def ddim(self, latents: np.ndarray) -> np.ndarray:
        from diffusers import DDIMScheduler

        ddpm = self.pipe.scheduler
        self.pipe.scheduler = DDIMScheduler.from_config(ddpm.config)
        try:
            return self.pipe(batch_size=len(latents), latents=torch.from_numpy(latents).to(self.device), eta=0.0,
                             num_inference_steps=PARITY_STEPS, output_type="np").images
        finally:
            self.pipe.scheduler = ddpm


class PlainUNet:
    """eps_theta with `session.run` and NumPy feeds every step: the naive loop IO binding is compared with."""

    def __init__(self, session: Any, shape: tuple[int, ...]) -> None:
        self.session = session
        self.sample = np.zeros(shape, dtype=np.float32)
        self.timestep = np.zeros(shape[:1], dtype=np.int64)
        self.names = [value.name for value in session.get_inputs()]

    def __call__(self, t: int) -> np.ndarray:
        self.timestep.fill(t)
        return self.session.run(None, {self.names[0]: self.sample, self.names[1]: self.timestep})[0]


def export_random_pipeline(preset: str, folder: Path) -> dict[str, Path]:
    """A saved `--preset` pipeline with random weights, and those of its float32 and float16 exports that succeed."""
    from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler
    from ddpm_plugin.export.onnx_export import export_onnx

    torch.manual_seed(0)
    DDPMPaperPipeline(unet=PaperUNet2DModel.from_preset(preset).eval(), scheduler=paper_scheduler(preset)).save_pretrained(folder)
    exports = {"pipeline": folder}
    for name in ("fp32", "fp16"):
        try:
            export_onnx(folder, folder / f"onnx-{name}", fp16=name == "fp16", seed=0)
            exports[name] = folder / f"onnx-{name}"
        except Exception as error:  # its rows are left out; the others still run
            print(f"the {name} export {failure(error)}", flush=True)
    return exports


def rows_for(exports: dict[str, Path]) -> list[Row]:
    """The table's rows, most wanted first (a spent `--budget-s` drops the last ones); PyTorch float32 first, as the
    reference of every row's samples."""
    def ort(weights: str, mode: str, cuda_graph: bool, bound: bool) -> list[Row]:
        if weights not in exports:
            return []
        return [Row(f"onnxruntime {weights}", mode, lambda: OrtSampler(exports[weights], cuda_graph, bound))]

    def pytorch(mode: str, dtype: torch.dtype, compile: bool) -> list[Row]:
        return [Row("PyTorch", mode, lambda: TorchSampler(exports["pipeline"], dtype, compile))]

    return [
        *pytorch("float32, eager", torch.float32, False),
        *ort("fp32", "IO binding + CUDA graph", True, True),
        *ort("fp16", "IO binding + CUDA graph", True, True),
        *pytorch("bfloat16 weights, torch.compile reduce-overhead", torch.bfloat16, True),
        *ort("fp32", "IO binding", False, True),
        *ort("fp16", "IO binding", False, True),
        *ort("fp32", "session.run, NumPy feeds", False, False),
        *ort("fp16", "session.run, NumPy feeds", False, False),
    ]


def seconds(sampler: Any, batch_size: int, steps: int) -> float:
    """Wall time of one sampling run, the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    begin = time.perf_counter()
    sampler.sample(batch_size, steps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def ms_per_step(sampler: Any, batch_size: int, steps: int, repeats: int) -> float:
    """Median milliseconds per step of `repeats` runs, after a warm-up (arena, graph capture, compilation)."""
    sampler.sample(batch_size, 2)
    return 1000 * statistics.median(seconds(sampler, batch_size, steps) for _ in range(repeats)) / steps


def versions() -> str:
    import onnxruntime as ort

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        driver = smi.stdout.strip() or "unknown"
    except OSError:
        driver = "unknown"
    return (f"{torch.cuda.get_device_name()}, driver {driver}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}")


def failure(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {' '.join(str(error).split())[:160]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--model", type=Path, help="a pipeline folder with its float32 export in onnx/ (default: random --preset)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 128, 256])
    parser.add_argument("--steps", type=int, default=20, help="DDPM steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end-to-end-batch", type=int, default=256)
    parser.add_argument("--end-to-end-steps", type=int, default=1000, help="0: no end-to-end run")
    parser.add_argument("--budget-s", type=float, default=300, help="start no cell after this many seconds")
    parser.add_argument("--output", type=Path, help="also write the results as Markdown here")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print(f"no CUDA device found: torch {torch.__version__} sees no GPU here, so nothing was run (this benchmark needs an NVIDIA GPU).")
        return 0
    from ddpm_plugin.export.providers import check_cuda

    cuda = check_cuda()
    if not cuda.usable:
        print(f"onnxruntime cannot use the GPU, so nothing was run: {cuda.reason}.")
        return 1
    deadline = time.monotonic() + args.budget_s
    header = [f"device: {versions()}",
              f"{args.steps} DDPM steps per timed run, median of {args.repeats} runs after a 2-step warm-up; ms per step, NumPy/torch step included"]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        exports = ({"pipeline": args.model, "fp32": args.model / "onnx"} if args.model
                   else export_random_pipeline(args.preset, Path(scratch) / args.preset))
        table, fastest = measure(rows_for(exports), args, deadline)
        end_to_end = run_end_to_end(fastest, args) if args.end_to_end_steps else []
    text = "\n".join([*header, "", *table, "", *end_to_end])
    print("\n" + text)
    if args.output:
        args.output.write_text(f"# onnxruntime CUDA vs PyTorch on one GPU\n\n    python benchmarks/onnx_cuda.py {' '.join(sys.argv[1:])}\n\n{text}\n")
    return 0


def measure(rows: list[Row], args: argparse.Namespace, deadline: float) -> tuple[list[str], dict[str, Any]]:
    """The Markdown table, and the samplers kept for the end-to-end run: the fastest ONNX row at the end-to-end
    batch size ("onnxruntime") and PyTorch bf16 + compile ("PyTorch")."""
    table = ["| engine | mode | " + " | ".join(f"batch {b} (ms/step)" for b in args.batch_sizes)
             + f" | max abs diff vs PyTorch fp32 (DDIM, {PARITY_STEPS} steps, batch {PARITY_BATCH}) |",
             "|---|---|" + "---:|" * (len(args.batch_sizes) + 1)]
    reference, kept, best = None, {}, float("inf")
    for row in rows:
        cells, parity, sampler = [], "-", None
        try:
            if time.monotonic() > deadline:
                raise TimeoutError("not run: --budget-s spent")
            sampler = row.load()
            latents = torch.randn((PARITY_BATCH, *sampler.image_shape), generator=torch.Generator().manual_seed(1)).numpy()
            images = sampler.ddim(latents)
            if row.engine == "PyTorch" and row.mode.startswith("float32"):
                reference = images
            parity = "no reference" if reference is None else f"{np.abs(images - reference).max():.1e}"
            for batch_size in args.batch_sizes:
                if time.monotonic() > deadline:
                    cells.append("not run (budget)")
                    continue
                ms = ms_per_step(sampler, batch_size, args.steps, args.repeats)
                cells.append(f"{ms:.2f}")
                if batch_size == args.end_to_end_batch and row.engine.startswith("onnxruntime") and ms < best:
                    best, kept["onnxruntime"] = ms, (row, sampler)
            if "compile" in row.mode:
                kept["PyTorch"] = (row, sampler)
        except Exception as error:  # a row that fails (e.g. graph capture refused) is reported and the others go on
            cells.append(failure(error))
        cells += [""] * (len(args.batch_sizes) - len(cells))
        table.append(f"| {row.engine} | {row.mode} | " + " | ".join(cells) + f" | {parity} |")
        print(table[-1], flush=True)
        sampler = None  # freed unless kept for the end-to-end run
        gc.collect()
    return table, kept


def run_end_to_end(kept: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Seconds for `--end-to-end-batch` samples x `--end-to-end-steps` DDPM steps, once each (already warm)."""
    lines = [f"{args.end_to_end_batch} samples x {args.end_to_end_steps} DDPM steps, end to end (one run, warm):"]
    for engine in ("onnxruntime", "PyTorch"):
        if engine not in kept:
            lines.append(f"- {engine}: not run (no {engine} row ran at batch {args.end_to_end_batch})")
            continue
        row, sampler = kept[engine]
        try:
            lines.append(f"- {row.engine}, {row.mode}: {seconds(sampler, args.end_to_end_batch, args.end_to_end_steps):.1f} s")
        except Exception as error:
            lines.append(f"- {row.engine}, {row.mode}: {failure(error)}")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    sys.exit(main())
