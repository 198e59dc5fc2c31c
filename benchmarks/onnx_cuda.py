"""`OnnxDDPMPipeline` on CUDA: plain `session.run` vs IO binding vs IO binding + ORT CUDA graphs (fp32, fp16).

Needs an NVIDIA GPU with a CUDA runtime onnxruntime-gpu can use; elsewhere it prints why it skips and exits 0
(it is not part of CI). It exports a randomly initialised UNet of `--preset` (speed does not depend on
training), or uses `--model DIR` (a pipeline folder with its export in `onnx/`), then prints one table of
milliseconds per denoising step and checks that every mode samples the same images.

    python benchmarks/onnx_cuda.py                       # cifar10, batch 1 and 8, 100 steps
    python benchmarks/onnx_cuda.py --preset celebahq --batch-sizes 1 4 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def export_random_pipeline(preset: str, folder: Path, fp16: bool) -> Path:
    import torch

    from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler
    from ddpm_plugin.export.onnx_export import export_onnx

    path = folder / preset
    if not (path / "model_index.json").is_file():
        torch.manual_seed(0)
        DDPMPaperPipeline(unet=PaperUNet2DModel.from_preset(preset).eval(), scheduler=paper_scheduler(preset)).save_pretrained(path)
    output = path / ("onnx-fp16" if fp16 else "onnx")
    export_onnx(path, output, fp16=fp16, seed=0)
    return output


def time_per_step(sample, repeats: int, steps: int) -> float:
    sample()  # warm-up: session arena, CUDA graph capture
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        sample()
        times.append(time.perf_counter() - begin)
    return 1000 * statistics.median(times) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--model", help="pipeline folder with onnx/ (default: a random --preset pipeline)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
    from ddpm_plugin.export.providers import check_cuda

    cuda = check_cuda()
    if not cuda.usable:
        print(f"skipped: no usable CUDA runtime for onnxruntime here ({cuda.reason}).")
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        if args.model:
            exports = {"fp32": Path(args.model) / "onnx"}
        else:
            exports = {name: export_random_pipeline(args.preset, Path(scratch), fp16=name == "fp16") for name in ("fp32", "fp16")}
        modes = [
            ("fp32", "session.run, NumPy feeds", dict(cuda_graph=False), "plain"),
            ("fp32", "IO binding", dict(cuda_graph=False), "bound"),
            ("fp32", "IO binding + CUDA graph", dict(cuda_graph=True), "bound"),
            ("fp16", "IO binding + CUDA graph", dict(cuda_graph=True), "bound"),
        ]
        print(f"device: {cuda.reason}; {args.steps} DDPM steps; median of {args.repeats} runs")
        print()
        print("| weights | mode | " + " | ".join(f"batch {b} (ms/step)" for b in args.batch_sizes) + " | max abs diff vs first row |")
        print("|---|---|" + "---:|" * (len(args.batch_sizes) + 1))
        reference = None
        for weights, mode, options, runner in modes:
            if weights not in exports:
                continue
            cells, difference = [], "-"
            try:
                pipe = OnnxDDPMPipeline.from_pretrained(exports[weights], provider="cuda", **options)
                for batch_size in args.batch_sizes:
                    if runner == "plain":
                        pipe.bound_unet = _unbound_unet(pipe)
                    sample = lambda: pipe(batch_size=batch_size, num_inference_steps=args.steps, seed=0, progress_bar=False)  # noqa: E731
                    cells.append(f"{time_per_step(sample, args.repeats, args.steps):.2f}")
                images = pipe(batch_size=args.batch_sizes[-1], num_inference_steps=args.steps, seed=0, progress_bar=False).images
                if reference is None:
                    reference = images
                difference = f"{np.abs(images - reference).max():.1e}"
            except Exception as error:  # report the mode as failed and go on with the others
                cells = cells + [f"failed: {type(error).__name__}: {str(error)[:120]}"]
            cells += [""] * (len(args.batch_sizes) - len(cells))
            print(f"| {weights} | {mode} | " + " | ".join(cells) + f" | {difference} |")
    return 0


def _unbound_unet(pipe):
    """A `bound_unet` stand-in that feeds NumPy arrays to `session.run` every step (the naive loop)."""
    from ddpm_plugin.export.onnx_pipeline import BoundUNet

    class UnboundUNet(BoundUNet):
        def __call__(self, t: int) -> np.ndarray:
            self.timestep.fill(t)
            (self.noise_pred,) = self.session.run(None, {"sample": self.sample, "timestep": self.timestep})
            return self.noise_pred

    cache = {}

    def bound_unet(batch_size: int) -> BoundUNet:
        if batch_size not in cache:
            cache[batch_size] = UnboundUNet(pipe.session, (batch_size, *pipe.image_shape), "cpu")
        return cache[batch_size]

    return bound_unet


if __name__ == "__main__":
    sys.exit(main())
