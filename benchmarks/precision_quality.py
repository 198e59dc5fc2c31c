"""Quality per precision: PyTorch fp32 and bf16, ONNX fp32 and int8 (and with `--openvino`, OpenVINO fp32 and
bf16), on the same images and the same noise.

For each precision it reports, against its float32 counterpart:

- bits/dim of the same test images with the same x_t (one generator seed), from the PyTorch bound
  (`DDPMPaperPipeline.bits_per_dim`); the ONNX graphs are measured through the same bound by standing in for
  the UNet, so every row's eps error is priced the way the paper prices it;
- the eps error on held-out x_t (`ddpm_plugin.export.quantize`): L_simple and its Eq. 12-weighted rise;
- sample agreement from the same x_T: DDIM (deterministic) and DDPM ancestral sampling with the same per-step
  noise, as the mean and max |difference| in pixel levels (0..255) and, for 28x28 grayscale models, how often
  the digit classifier gives both samples the same label;
- for 28x28 grayscale models, the sample quality itself: the Frechet distance of the digit classifier's features
  of the samples to those of the reference images (`--reference`, by default the 10,000 MNIST test images), the
  paper's FID with `ddpm_plugin.classifier` in place of Inception. Every precision starts from the same x_T, so
  the distances differ by what the precision changes, not by which noise was drawn.

Each measure of each precision is saved in `<output>.rows/` as soon as it is done, and the table is made from
what is there: a run that is stopped resumes where it was, and precisions can run in separate processes
(`--precisions`) that share the folder. Bits/dim comes first for every precision, then DDIM, then DDPM.

    python benchmarks/precision_quality.py                                   # the bundled digits model
    python benchmarks/precision_quality.py --model mnist --images 32 --samples 500 --ddpm-samples 100 --bf16 both

bf16 runs under `torch.autocast` (`--bf16 dtype` loads with `torch_dtype=torch.bfloat16` instead; `both`: two rows).
`--float32-below-t N` adds the time-step-aware rows `<precision>+fp32-below-tN` for bf16 and int8: the reduced
precision for t >= N and float32 for t < N, where the bound weighs eps errors most (paper Eq. 12; bf16 weights: a
float32 copy of them), as `ddpm export --quantize int8 --float32-below-t N` and `DDPMPaperPipeline(...,
float32_below_t=N)` sample.
`--openvino` adds `openvino-fp32` and `openvino-bf16`: `ddpm export`'s float32 graph on OpenVINO
(`export.openvino_engine`) at OpenVINO's float32 or bf16 inference precision on every t; its scheduled row
`openvino-bf16+fp32-below-tN` runs OpenVINO's float32 compilation of the same graph for t < N, as
`open_sampler(..., "openvino", precision="bf16")` samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BF16_MODES = ("autocast", "dtype")
ONNX_PRECISIONS = ("onnx-fp32", "onnx-int8")
OPENVINO_PRECISIONS = ("openvino-fp32", "openvino-bf16")
MNIST_TEST = Path(os.environ.get("DDPM_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")) / "mnist_test.npz"


class StandInUNet(torch.nn.Module):
    """What the pipeline asks of its UNet besides the call: a float32 network on the CPU."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class OnnxUNet(StandInUNet):
    """An exported UNet behind `UNet2DModel`'s call, so the PyTorch pipeline and bound can run the ONNX graph."""

    def __init__(self, folder: Path, config: Any, threads: int) -> None:
        super().__init__()
        from ddpm_plugin.export.sampler import open_sampler

        self.session = open_sampler(folder, "onnxruntime", num_threads=threads, progress_bar=False).pipe.session
        self.config = config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> Any:
        from diffusers.models.unets.unet_2d import UNet2DOutput

        timestep = torch.as_tensor(timestep, dtype=torch.int64).expand(sample.shape[0]).contiguous()
        feeds = {"sample": sample.detach().float().contiguous().numpy(), "timestep": timestep.numpy()}
        return UNet2DOutput(sample=torch.from_numpy(self.session.run(None, feeds)[0]))


class OpenVinoUNet(StandInUNet):
    """An export on OpenVINO at one inference precision for every t, behind `UNet2DModel`'s call; compiled once
    per batch size, and a batch that mixes t runs one call per t."""

    def __init__(self, folder: Path, config: Any, precision: str, threads: int) -> None:
        super().__init__()
        from ddpm_plugin.export.onnx_folder import open_export_folder
        from ddpm_plugin.export.openvino_engine import OpenVinoEngine

        export = open_export_folder(folder)
        self.engine = OpenVinoEngine(export.model_path, export.image_shape, precision, threads)
        self.config = config
        self.compiled: dict[int, Any] = {}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> Any:
        from diffusers.models.unets.unet_2d import UNet2DOutput

        timestep = torch.as_tensor(timestep, dtype=torch.int64).expand(sample.shape[0])
        sample = sample.detach().float()
        eps = torch.empty(sample.shape, dtype=torch.float32)
        for t in torch.unique(timestep).tolist():
            rows = timestep == t
            count = int(rows.sum())
            if count not in self.compiled:
                self.compiled[count] = self.engine.bind(count)
            unet = self.compiled[count]
            np.copyto(unet.sample, sample[rows].numpy())
            eps[rows] = torch.from_numpy(unet(t).copy())
        return UNet2DOutput(sample=eps)


def scheduled_name(name: str, below_t: int) -> str:
    return f"{name}+fp32-below-t{below_t}"


def precision_names(bf16: str, below_t: int = 0, openvino: bool = False) -> list[str]:
    """The rows, in order: `pytorch-bf16-<mode>` for each bf16 mode asked for (`both`: autocast and dtype), the
    ONNX rows, with `openvino` the OpenVINO rows, and with `below_t` the time-step-aware rows of each bf16 row and
    of int8."""
    modes = BF16_MODES if bf16 == "both" else (bf16,)
    names = ["pytorch-fp32", *(f"pytorch-bf16-{mode}" for mode in modes), *ONNX_PRECISIONS,
             *(OPENVINO_PRECISIONS if openvino else ())]
    if below_t:
        names += [scheduled_name(name, below_t) for name in names
                  if name.startswith("pytorch-bf16") or name in ("onnx-int8", "openvino-bf16")]
    return names


def runtime_reference(name: str) -> str:
    """The float32 row of the runtime of row `name`."""
    return next((f"{runtime}-fp32" for runtime in ("onnx", "openvino") if name.startswith(f"{runtime}-")), "pytorch-fp32")


def load_precision(name: str, model: Path, onnx_folders: dict[str, Path], threads: int) -> tuple[Any, Any, int]:
    """(pipeline, context manager factory, float32_below_t) of the precision `name` (of `precision_names`). The
    time-step-aware rows run as `DDPMPaperPipeline(..., float32_below_t=N)` samples (`predict_eps`); an ONNX
    pipeline's float32 network is the float32 export."""
    from ddpm_plugin import DDPMPaperPipeline

    base, _, below_t = name.partition("+fp32-below-t")
    if base == "pytorch-bf16-dtype":
        pipe, context = DDPMPaperPipeline.from_pretrained(model, torch_dtype=torch.bfloat16), contextlib.nullcontext
    else:
        pipe, context = DDPMPaperPipeline.from_pretrained(model), contextlib.nullcontext
    if base == "pytorch-bf16-autocast":
        context = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    if base in ONNX_PRECISIONS:
        onnx_pipe = DDPMPaperPipeline(unet=OnnxUNet(onnx_folders[base], pipe.unet.config, threads), scheduler=pipe.scheduler)
        float32 = OnnxUNet(onnx_folders["onnx-fp32"], pipe.unet.config, threads) if below_t else onnx_pipe.unet
        onnx_pipe.float32_network = lambda: float32  # the float32 graph, where `predict_eps` asks for float32
        pipe = onnx_pipe
    if base in OPENVINO_PRECISIONS:
        network = OpenVinoUNet(onnx_folders["openvino"], pipe.unet.config, base.removeprefix("openvino-"), threads)
        openvino_pipe = DDPMPaperPipeline(unet=network, scheduler=pipe.scheduler)
        float32 = OpenVinoUNet(onnx_folders["openvino"], pipe.unet.config, "fp32", threads) if below_t else network
        openvino_pipe.float32_network = lambda: float32  # OpenVINO's float32 compilation of the same graph
        pipe = openvino_pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe, context, int(below_t or 0)


def samples(pipe: Any, context: Any, below_t: int, latents: torch.Tensor, steps: int, scheduler: str) -> np.ndarray:
    """uint8 samples from the x_T `latents`; DDPM's per-step noise from one seed."""
    from diffusers import DDIMScheduler, DDPMScheduler

    original = pipe.scheduler
    pipe.scheduler = (DDIMScheduler if scheduler == "ddim" else DDPMScheduler).from_config(original.config)
    try:
        with context(), torch.no_grad():
            images = pipe(batch_size=len(latents), num_inference_steps=steps, latents=latents.clone(),
                          generator=torch.manual_seed(1), output_type="np", float32_below_t=below_t).images
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


def classifier_frechet_distance(images: np.ndarray, classifier: Any, reference_features: np.ndarray) -> float:
    """The Frechet distance of the digit classifier's features of uint8 NHWC `images` to `reference_features`."""
    from ddpm_plugin.classifier import classify, frechet_distance

    return frechet_distance(classify(classifier, images[..., 0])[0], reference_features)


def export_graphs(model: Path, scratch: Path, int8: str | None, onnx: bool = True, openvino: bool = False) -> tuple[dict[str, Path], dict | None]:
    """With `onnx`, the float32 and int8 graphs, both from the TorchScript exporter (the int8 one quantized from the
    same float32 graph, calibrated on the model's training data), and the int8 graph's eps quality (`int8`: an
    existing int8 export to use instead); with `openvino`, `ddpm export`'s float32 graph (the dynamo exporter),
    which the OpenVINO rows run."""
    from ddpm_plugin.export.onnx_export import export_onnx
    from ddpm_plugin.export.quantize import Int8Settings

    folders: dict[str, Path] = {}
    if openvino:
        folders["openvino"] = export_onnx(model, scratch / "dynamo", seed=0).output_dir
    if not onnx:
        return folders, None
    fp32 = export_onnx(model, scratch / "fp32", exporter="torchscript", seed=0).output_dir
    if int8:
        return ({**folders, "onnx-fp32": fp32, "onnx-int8": Path(int8)},
                json.loads((Path(int8) / "ddpm_onnx.json").read_text())["quality"])
    report = export_onnx(model, scratch / "int8", exporter="torchscript", seed=0,
                         quantize=Int8Settings(budget=1.0))
    return {**folders, "onnx-fp32": fp32, "onnx-int8": report.output_dir}, report.quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", help="pipeline folder, or a bundled model: digits, mnist")
    parser.add_argument("--dataset", default=None, help="test images (default: the model's training data set)")
    parser.add_argument("--images", type=int, default=64, help="images for bits/dim")
    parser.add_argument("--samples", type=int, default=64, help="DDIM samples (agreement, Frechet distance)")
    parser.add_argument("--ddpm-samples", type=int, default=None, help="DDPM samples (default: --samples)")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--int8", default=None, help="an int8 export to measure (default: exported here)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", choices=(*BF16_MODES, "both"), default="autocast")
    parser.add_argument("--float32-below-t", type=int, default=0,
                        help="add rows with bf16 / int8 for t >= N and float32 for t < N")
    parser.add_argument("--openvino", action="store_true", help="add the OpenVINO rows (openvino-fp32, openvino-bf16)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated rows to measure here (default: all; `none`: only the table of what is saved)")
    parser.add_argument("--reference", default=str(MNIST_TEST),
                        help="uint8 images (.npz `images`) the Frechet distance is measured against (28x28 models)")
    parser.add_argument("--output", default="test-output/precision_quality.json")
    args = parser.parse_args()

    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.evaluation import dataset_images
    from ddpm_plugin.export.providers import physical_cpu_count

    threads = args.threads or physical_cpu_count()
    torch.set_num_threads(threads)
    model = resolve_model(args.model)
    names = precision_names(args.bf16, args.float32_below_t, args.openvino)
    run_here = names if args.precisions is None else [] if args.precisions == "none" else args.precisions.split(",")
    if set(run_here) - set(names):
        raise ValueError(f"`--precisions` names unknown rows {sorted(set(run_here) - set(names))}; the rows are {names}.")
    ddpm_samples = args.ddpm_samples or args.samples
    dataset = args.dataset or json.loads((model / "training_config.json").read_text())["dataset"]
    settings = {"model": str(model), "dataset": dataset, "images": args.images, "samples": args.samples,
                "ddpm_samples": ddpm_samples, "ddim_steps": args.ddim_steps, "ddpm_steps": args.ddpm_steps,
                "int8": args.int8, "reference": args.reference}
    rows_dir = Path(args.output).with_suffix(".rows")
    rows_dir.mkdir(parents=True, exist_ok=True)
    settings_file = rows_dir / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"{rows_dir} holds rows measured with other settings; remove it or pass another --output.")
    settings_file.write_text(json.dumps(settings, indent=1) + "\n")

    started, cpu_started = time.perf_counter(), time.process_time()
    measures = [("bpd", None), ("ddim", args.ddim_steps), ("ddpm", args.ddpm_steps)]
    with tempfile.TemporaryDirectory() as scratch:
        onnx_folders: dict[str, Path] = {}
        onnx, openvino = (any(name.startswith(f"{runtime}-") for name in run_here) for runtime in ("onnx", "openvino"))
        if onnx or openvino:
            onnx_folders, int8_quality = export_graphs(model, Path(scratch), args.int8, onnx, openvino)
            if int8_quality is not None:
                (rows_dir / "int8_eps_quality.json").write_text(json.dumps(int8_quality, indent=1) + "\n")
        pipes = {name: load_precision(name, model, onnx_folders, threads) for name in run_here}
        unet_config = json.loads((model / "unet" / "config.json").read_text())
        shape = (unet_config["in_channels"], unet_config["sample_size"], unet_config["sample_size"])
        images, _ = dataset_images(dataset, shape, args.images, seed=0, split="test")
        latents = torch.randn((max(args.samples, ddpm_samples), *shape), generator=torch.manual_seed(0))
        # Each measure for every precision before the next measure: bits/dim, DDIM, then DDPM (the slowest).
        for measure, steps in measures:
            for name, (pipe, context, below_t) in pipes.items():
                path = rows_dir / f"{name}.{measure}.npy"
                if path.is_file():
                    continue
                if measure == "bpd":
                    with context(), torch.no_grad():
                        bound = pipe.bits_per_dim(images, batch_size=256, generator=torch.manual_seed(0),
                                                  float32_below_t=below_t)
                    result = np.array(float(bound.total_bpd.mean()))
                else:
                    n = args.samples if measure == "ddim" else ddpm_samples
                    result = samples(pipe, context, below_t, latents[:n], steps, measure)
                np.save(path, result)
                print(f"# {name} {measure}: done at {time.perf_counter() - started:.0f} s", flush=True)
    report = make_report(rows_dir, names, settings, shape, threads)
    report["wall_s"], report["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu_started
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)


def make_report(rows_dir: Path, names: list[str], settings: dict, shape: tuple, threads: int) -> dict:
    """The report from every measure found in `rows_dir`: each row against the float32 row of its runtime."""
    classifier, reference_features = None, None
    if shape == (1, 28, 28):
        from ddpm_plugin.classifier import classify, load_classifier

        classifier = load_classifier()
        reference_features = classify(classifier, np.load(settings["reference"])["images"])[0]
    found = {name: {measure: np.load(rows_dir / f"{name}.{measure}.npy") for measure in ("bpd", "ddim", "ddpm")
                    if (rows_dir / f"{name}.{measure}.npy").is_file()} for name in names}
    quality_file = rows_dir / "int8_eps_quality.json"
    report = {**settings, "threads": threads, "rows": {},
              "int8_eps_quality": json.loads(quality_file.read_text()) if quality_file.is_file() else None}
    for name, row in found.items():
        if not row:  # not measured (yet)
            continue
        reference = found[runtime_reference(name)]
        entry: dict[str, Any] = {}
        if "bpd" in row:
            entry["bits_per_dim"] = float(row["bpd"])
            if "bpd" in found["pytorch-fp32"]:
                entry["bits_per_dim_change"] = float(row["bpd"]) / float(found["pytorch-fp32"]["bpd"]) - 1
        for measure in ("ddim", "ddpm"):
            if measure not in row:
                continue
            result: dict[str, Any] = {"n": len(row[measure])}
            if measure in reference:
                result["vs_fp32"] = agreement(row[measure], reference[measure], classifier)
            if classifier is not None:
                result["frechet_distance"] = classifier_frechet_distance(row[measure], classifier, reference_features)
            entry[measure] = result
        report["rows"][name] = entry
    for entry in report["rows"].values():  # the distance against PyTorch fp32's on the same x_T
        for measure in ("ddim", "ddpm"):
            base = report["rows"].get("pytorch-fp32", {}).get(measure, {}).get("frechet_distance")
            if base and "frechet_distance" in entry.get(measure, {}):
                entry[measure]["frechet_change"] = entry[measure]["frechet_distance"] / base - 1
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['model']}: bits/dim on {report['images']} {report['dataset']} images (same x_t for every row); "
          f"samples from the same x_T, pixel agreement against the float32 row of the same runtime, Frechet "
          f"distance of the digit classifier's features to {report['reference']}; {report['threads']} threads, "
          f"{report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU.")
    quality = report["int8_eps_quality"]
    if quality:
        print(f"int8 eps error on held-out x_t: L_simple {quality['loss_rise']:+.2%}, Eq. 12-weighted "
              f"{quality['bound_rise']:+.2%}, relative RMS change of eps {quality['eps_relative_rms']:.2%}.")
    ddim, ddpm = f"DDIM-{report['ddim_steps']}", f"DDPM-{report['ddpm_steps']}"
    print(f"\n| precision | bits/dim | vs PyTorch fp32 | {ddim} n | {ddim} Frechet (vs fp32) | {ddim} mean / max abs "
          f"pixel diff | same label | {ddpm} n | {ddpm} Frechet (vs fp32) | {ddpm} mean / max abs pixel diff | same label |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in report["rows"].items():
        cells = [name, f"{row['bits_per_dim']:.4f}" if "bits_per_dim" in row else "-",
                 f"{row['bits_per_dim_change']:+.2%}" if "bits_per_dim_change" in row else "-"]
        for key in ("ddim", "ddpm"):
            result = row.get(key, {})
            frechet = f"{result['frechet_distance']:.2f}" if "frechet_distance" in result else "-"
            if "frechet_change" in result:
                frechet += f" ({result['frechet_change']:+.1%})"
            pixels = result.get("vs_fp32", {})
            cells += [str(result.get("n", "-")), frechet,
                      f"{pixels['mean_abs_pixel']:.2f} / {pixels['max_abs_pixel']}" if pixels else "-",
                      f"{pixels['same_label']:.0%}" if "same_label" in pixels else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
