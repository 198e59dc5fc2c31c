"""Quality per precision: PyTorch fp32 and bf16, ONNX fp32 and int8, on the same images and the same noise.

For each precision it reports, against its float32 counterpart:

- bits/dim of the same test images with the same x_t (one generator seed), from the PyTorch bound
  (`DDPMPaperPipeline.bits_per_dim`); the ONNX graphs are measured through the same bound by standing in for
  the UNet, so every row's eps error is priced the way the paper prices it;
- the eps error on held-out x_t (`ddpm_plugin.export.quantize`): L_simple and its Eq. 12-weighted rise;
- sample agreement from the same x_T: DDIM (deterministic) and DDPM ancestral sampling with the same per-step
  noise, as the mean and max |difference| in pixel levels (0..255) and, for 28x28 grayscale models, how often
  the digit classifier gives both samples the same label.

    python benchmarks/precision_quality.py                                   # the bundled digits model
    python benchmarks/precision_quality.py --model mnist --images 32 --samples 32

bf16 runs under `torch.autocast` (`--bf16 dtype` loads with `torch_dtype=torch.bfloat16` instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


class OnnxUNet(torch.nn.Module):
    """An exported UNet behind `UNet2DModel`'s call, so the PyTorch pipeline and bound can run the ONNX graph."""

    def __init__(self, folder: Path, config: Any, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        from ddpm_plugin.export.providers import CPU, session_options

        self.session = ort.InferenceSession(str(folder / "model.onnx"), session_options(threads), providers=[CPU])
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> Any:
        from diffusers.models.unets.unet_2d import UNet2DOutput

        timestep = torch.as_tensor(timestep, dtype=torch.int64).expand(sample.shape[0]).contiguous()
        feeds = {"sample": sample.detach().float().contiguous().numpy(), "timestep": timestep.numpy()}
        return UNet2DOutput(sample=torch.from_numpy(self.session.run(None, feeds)[0]))


def load_precisions(model: Path, int8: Path, fp32: Path, threads: int, bf16: str) -> dict[str, tuple[Any, Any]]:
    """name -> (pipeline, context manager factory) for every precision."""
    from ddpm_plugin import DDPMPaperPipeline

    fp32_pipe = DDPMPaperPipeline.from_pretrained(model)
    if bf16 == "dtype":
        bf16_pipe, bf16_context = DDPMPaperPipeline.from_pretrained(model, torch_dtype=torch.bfloat16), contextlib.nullcontext
    else:
        bf16_pipe, bf16_context = fp32_pipe, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    pipes = {"pytorch-fp32": (fp32_pipe, contextlib.nullcontext), "pytorch-bf16": (bf16_pipe, bf16_context)}
    for name, folder in (("onnx-fp32", fp32), ("onnx-int8", int8)):
        pipe = DDPMPaperPipeline(unet=OnnxUNet(folder, fp32_pipe.unet.config, threads), scheduler=fp32_pipe.scheduler)
        pipes[name] = (pipe, contextlib.nullcontext)
    for pipe, _ in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def samples(pipe: Any, context: Any, latents: torch.Tensor, steps: int, scheduler: str) -> np.ndarray:
    """uint8 samples from the x_T `latents`; DDPM's per-step noise from one seed."""
    from diffusers import DDIMScheduler, DDPMScheduler

    original = pipe.scheduler
    pipe.scheduler = (DDIMScheduler if scheduler == "ddim" else DDPMScheduler).from_config(original.config)
    try:
        with context(), torch.no_grad():
            images = pipe(batch_size=len(latents), num_inference_steps=steps, latents=latents.clone(),
                          generator=torch.manual_seed(1), output_type="np").images
    finally:
        pipe.scheduler = original
    return np.round(np.asarray(images, dtype=np.float64) * 255).astype(np.uint8)


def agreement(images: np.ndarray, reference: np.ndarray, classifier: Any) -> dict[str, float]:
    difference = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    result = {"mean_abs_pixel": float(difference.mean()), "max_abs_pixel": int(difference.max())}
    if classifier is not None:
        from ddpm_plugin.classifier import classify

        labels, reference_labels = (classify(classifier, x[..., 0])[1].argmax(1) for x in (images, reference))
        result["same_label"] = float((labels == reference_labels).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="pipeline folder, or a bundled model: digits, mnist")
    parser.add_argument("--dataset", default=None, help="test images (default: the model's training data set)")
    parser.add_argument("--images", type=int, default=64, help="images for bits/dim")
    parser.add_argument("--samples", type=int, default=64, help="samples for the agreement measures")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--int8", default=None, help="an int8 export to measure (default: exported here)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", choices=("autocast", "dtype"), default="autocast")
    parser.add_argument("--output", default="test-output/precision_quality.json")
    args = parser.parse_args()

    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.evaluation import dataset_images
    from ddpm_plugin.export.onnx_export import export_onnx
    from ddpm_plugin.export.providers import physical_cpu_count
    from ddpm_plugin.export.quantize import Int8Settings

    threads = args.threads or physical_cpu_count()
    torch.set_num_threads(threads)
    model = resolve_model(args.model)
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as scratch:
        # Both graphs from the TorchScript exporter: the int8 one is quantized from the same float32 graph.
        fp32 = export_onnx(model, Path(scratch) / "fp32", exporter="torchscript", seed=0).output_dir
        if args.int8:
            int8, int8_quality = Path(args.int8), json.loads((Path(args.int8) / "ddpm_onnx.json").read_text())["quality"]
        else:
            report = export_onnx(model, Path(scratch) / "int8", exporter="torchscript", seed=0,
                                 quantize=Int8Settings(calibration_data=args.dataset, budget=1.0))
            int8, int8_quality = report.output_dir, report.quality
        pipes = load_precisions(model, int8, fp32, threads, args.bf16)
        unet_config = pipes["pytorch-fp32"][0].unet.config
        shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
        dataset = args.dataset or json.loads((model / "training_config.json").read_text())["dataset"]
        images, _ = dataset_images(dataset, shape, args.images, seed=0)
        classifier = None
        if shape == (1, 28, 28):
            from ddpm_plugin.classifier import load_classifier

            classifier = load_classifier()
        latents = torch.randn((args.samples, *shape), generator=torch.manual_seed(0))
        rows = {}
        for name, (pipe, context) in pipes.items():
            with context(), torch.no_grad():
                bound = pipe.bits_per_dim(images, batch_size=256, generator=torch.manual_seed(0))
            rows[name] = {"bits_per_dim": float(bound.total_bpd.mean()),
                          "ddim": samples(pipe, context, latents, args.ddim_steps, "ddim"),
                          "ddpm": samples(pipe, context, latents, args.ddpm_steps, "ddpm")}
            print(f"# {name}: {rows[name]['bits_per_dim']:.4f} bits/dim", flush=True)
    report = {"model": str(model), "dataset": dataset, "images": args.images, "samples": args.samples,
              "threads": threads, "int8_eps_quality": int8_quality, "rows": {}}
    for name, row in rows.items():
        reference = rows["onnx-fp32" if name.startswith("onnx") else "pytorch-fp32"]
        report["rows"][name] = {
            "bits_per_dim": row["bits_per_dim"],
            "bits_per_dim_change": row["bits_per_dim"] / rows["pytorch-fp32"]["bits_per_dim"] - 1,
            f"ddim{args.ddim_steps}_vs_fp32": agreement(row["ddim"], reference["ddim"], classifier),
            f"ddpm{args.ddpm_steps}_vs_fp32": agreement(row["ddpm"], reference["ddpm"], classifier),
        }
    report["wall_s"], report["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu_started
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report, args)


def print_table(report: dict, args: argparse.Namespace) -> None:
    print(f"\n{report['model']}: bits/dim on {report['images']} {report['dataset']} images (same x_t for every row); "
          f"samples: {report['samples']} from the same x_T, against the float32 row of the same runtime; "
          f"{report['threads']} threads, {report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU.")
    quality = report["int8_eps_quality"]
    print(f"int8 eps error on held-out x_t: L_simple {quality['loss_rise']:+.2%}, Eq. 12-weighted "
          f"{quality['bound_rise']:+.2%}, relative RMS change of eps {quality['eps_relative_rms']:.2%}.\n")
    ddim, ddpm = f"ddim{args.ddim_steps}_vs_fp32", f"ddpm{args.ddpm_steps}_vs_fp32"
    print(f"| precision | bits/dim | vs PyTorch fp32 | DDIM-{args.ddim_steps} mean / max abs pixel diff | same label | "
          f"DDPM-{args.ddpm_steps} mean / max abs pixel diff | same label |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in report["rows"].items():
        cells = [name, f"{row['bits_per_dim']:.4f}", f"{row['bits_per_dim_change']:+.2%}"]
        for key in (ddim, ddpm):
            cells += [f"{row[key]['mean_abs_pixel']:.2f} / {row[key]['max_abs_pixel']}",
                      f"{row[key]['same_label']:.0%}" if "same_label" in row[key] else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
