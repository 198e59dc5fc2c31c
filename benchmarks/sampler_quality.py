"""Quality per second of the samplers on the bundled MNIST model: DPM-Solver++ (second-order multistep) against
DDIM, with the classifier Frechet distance, mean confidence and class balance of `mnist_quality.py`.

Every sampler draws the same images (seed 1, in batches seeded `seed + start`, as `mnist_quality.py` draws them)
on ONNX Runtime. Rows of `--reuse` (an earlier `mnist_quality.py` report) are taken over only when they hold the
same number of images, and after one of its DDIM rows, sampled again here, gives the same distance (the same
images). Seconds per image are timed separately, on 1 and on 2 onnxruntime threads, over `--timing-images`
images in one batch, the fastest of `--repeats` runs (`--quality-from` re-times an earlier report's rows
without sampling them again). The recommended default is the fastest sampler (2 threads) whose distance is within
`--tolerance` of DDIM-50's.

    python benchmarks/sampler_quality.py --model ddpm_plugin/bundled/ddpm-mnist \
        --reuse docs/results/mnist_quality.json --output docs/results/dpmsolver_mnist.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_quality import MNIST_DIR, quality, sample  # noqa: E402

from ddpm_plugin.classifier import classify, load_classifier  # noqa: E402

SEED = 1  # the seed of mnist_quality.py's samples


def label(scheduler: str, steps: int) -> str:
    return f"{'DPM-Solver++' if scheduler == 'dpmsolver++' else scheduler.upper()} {steps} steps"


def seconds_per_image(model: str, scheduler: str, steps: int, images: int, threads: int, repeats: int) -> float:
    """The fastest of `repeats` timed runs (the CPU is shared: the fastest is the least disturbed)."""
    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

    pipe = OnnxDDPMPipeline.from_pretrained(model, provider="cpu", num_threads=threads)
    pipe(batch_size=images, num_inference_steps=2, scheduler=scheduler, seed=0, progress_bar=False)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pipe(batch_size=images, num_inference_steps=steps, scheduler=scheduler, seed=SEED, progress_bar=False)
        times.append((time.perf_counter() - started) / images)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder with its onnx/ export")
    parser.add_argument("--samples", type=int, default=1000, help="images per sampler")
    parser.add_argument("--dpm-steps", default="5,10,15,20")
    parser.add_argument("--ddim-steps", default="10,20,50,100")
    parser.add_argument("--reuse", help="an earlier mnist_quality.py report whose rows of the same n are taken over")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--timing-images", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per sampler and thread count (fastest kept)")
    parser.add_argument("--quality-from", help="an earlier report of this script: its distances are kept, only timed again")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative distance allowed above DDIM-50's")
    parser.add_argument("--output", default="test-output/dpmsolver_mnist.json")
    args = parser.parse_args()

    classifier = load_classifier()
    test_features, _ = classify(classifier, np.load(MNIST_DIR / "mnist_test.npz")["images"])
    runs = [("dpmsolver++", int(s)) for s in args.dpm_steps.split(",") if s]
    runs += [("ddim", int(s)) for s in args.ddim_steps.split(",") if s]
    reused: dict[str, dict] = {}
    if args.quality_from:
        reused = {row["name"]: row for row in json.loads(Path(args.quality_from).read_text())["rows"]
                  if row["images"] == args.samples}
    elif args.reuse:
        earlier = {row["name"]: row for row in json.loads(Path(args.reuse).read_text())["rows"]}
        check = next((name for name in (label("ddim", s) for _, s in runs if _ == "ddim") if name in earlier), None)
        if check and earlier[check]["images"] == args.samples:
            steps = int(check.split()[1])
            images, _ = sample(args.model, args.samples, steps, "ddim", args.batch_size, seed=SEED, num_threads=2)
            again = quality(check, images, test_features, None, classifier)
            same = abs(again["frechet_distance"] - earlier[check]["frechet_distance"]) < 1e-6
            print(f"{check}: distance {again['frechet_distance']:.6f} here, {earlier[check]['frechet_distance']:.6f} "
                  f"in {args.reuse}: {'reusing its rows' if same else 'measuring everything'}", flush=True)
            if same:
                reused = {name: dict(row, reused_from=args.reuse) for name, row in earlier.items()
                          if row["images"] == args.samples and name.startswith("DDIM")}
                reused[check] = dict(again, remeasured=True)
    rows = []
    for scheduler, steps in runs:
        name = label(scheduler, steps)
        if name in reused:
            row = reused[name]
        else:
            images, _ = sample(args.model, args.samples, steps, scheduler, args.batch_size, seed=SEED, num_threads=2)
            row = quality(name, images, test_features, None, classifier)
        row = {key: value for key, value in row.items() if not key.startswith("seconds_per_image")}
        row.update(scheduler=scheduler, steps=steps)
        for threads in (1, 2):
            row[f"seconds_per_image_{threads}_threads"] = seconds_per_image(
                args.model, scheduler, steps, args.timing_images, threads, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)

    ddim50 = next(row for row in rows if row["scheduler"] == "ddim" and row["steps"] == 50)
    bound = ddim50["frechet_distance"] * (1 + args.tolerance)
    within = [row for row in rows if row["frechet_distance"] <= bound]
    best = min(within, key=lambda row: row["seconds_per_image_2_threads"])
    report = {
        "model": args.model, "samples": args.samples, "seed": SEED, "batch_size": args.batch_size,
        "timing_images": args.timing_images, "timing_repeats": args.repeats, "backend": "onnxruntime (CPU)", "tolerance": args.tolerance,
        "ddim50_frechet_distance": ddim50["frechet_distance"], "distance_bound": bound,
        "default": {"sampler": best["scheduler"], "steps": best["steps"]}, "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\ndefault: {label(best['scheduler'], best['steps'])} (distance <= {bound:.3f})\n")
    print("| sampler | network calls | n | Frechet distance | mean confidence | classes min-max | s/image, 1 thread | s/image, 2 threads |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for row in rows:
        fractions = row["class_fractions"]
        print(f"| {row['name']} | {row['steps']} | {row['images']} | {row['frechet_distance']:.3f} | "
              f"{row['mean_confidence']:.3f} | {min(fractions):.1%}-{max(fractions):.1%} | "
              f"{row['seconds_per_image_1_threads']:.4f} | {row['seconds_per_image_2_threads']:.4f} |")


if __name__ == "__main__":
    main()
