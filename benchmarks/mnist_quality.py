"""Sample quality of a 28x28 MNIST model, measured as the paper measures CIFAR-10, with a digit classifier in
place of Inception.

For each sampler (1000-step ancestral sampling, Algorithm 2, and DDIM with 10/20/50/100 steps) it samples with
`OnnxDDPMPipeline`, then reports the Frechet distance between the classifier's penultimate-layer features of the
samples and of the 10,000 MNIST test images, the classifier's mean confidence and class histogram, and the
seconds per image. For scale, the same distance of training images against the test images (the floor, at the
same number of images) and of pure N(0, I) noise images. The bound (bits/dim) is `ddpm evaluate`'s job.

    python benchmarks/mnist_quality.py --model ddpm_plugin/bundled/ddpm-mnist --output test-output/mnist_quality.json
    python benchmarks/mnist_quality.py --model DIR --samples 10000 --ancestral-samples 10000   # the full measure

The data are read from `$DDPM_MNIST_DIR` (default `../shared/data/mnist` beside the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ddpm_plugin.classifier import classify, frechet_distance, load_classifier

MNIST_DIR = Path(os.environ.get("DDPM_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))


def quality(name: str, images: np.ndarray, test_features: np.ndarray, seconds: float | None, model) -> dict:
    features, probabilities = classify(model, images)
    histogram = np.bincount(probabilities.argmax(1), minlength=10) / len(images)
    return {
        "name": name, "images": len(images), "frechet_distance": frechet_distance(features, test_features),
        "mean_confidence": float(probabilities.max(1).mean()), "class_fractions": histogram.round(4).tolist(),
        "seconds_per_image": seconds,
    }


def sample(model_dir: str, num_images: int, steps: int, scheduler: str, batch_size: int, seed: int,
           num_threads: int | None = None) -> tuple[np.ndarray, float]:
    from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline
    from ddpm_plugin.images import to_uint8

    pipe = OnnxDDPMPipeline.from_pretrained(model_dir, provider="cpu", num_threads=num_threads)
    started, batches = time.perf_counter(), []
    for start in range(0, num_images, batch_size):
        size = min(batch_size, num_images - start)
        images = pipe(batch_size=size, num_inference_steps=steps, scheduler=scheduler, seed=seed + start,
                      progress_bar=False).images
        batches.append(to_uint8(images)[..., 0])
    return np.concatenate(batches), (time.perf_counter() - started) / num_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder with its onnx/ export")
    parser.add_argument("--samples", type=int, default=2000, help="DDIM samples per step count")
    parser.add_argument("--ancestral-samples", type=int, default=500, help="1000-step DDPM samples (0: skip)")
    parser.add_argument("--ddim-steps", default="10,20,50,100")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: physical cores)")
    parser.add_argument("--output", default="test-output/mnist_quality.json")
    args = parser.parse_args()

    classifier = load_classifier()
    test, train = np.load(MNIST_DIR / "mnist_test.npz"), np.load(MNIST_DIR / "mnist_train.npz")
    test_features, test_probabilities = classify(classifier, test["images"])
    accuracy = float((test_probabilities.argmax(1) == test["labels"]).mean())
    rng = np.random.default_rng(0)
    rows = [quality("MNIST test images", test["images"], test_features, None, classifier)]
    sizes = sorted({args.samples, args.ancestral_samples, 10_000} - {0})
    for n in sizes:
        subset = train["images"][rng.choice(len(train["images"]), n, replace=False)]
        rows.append(quality(f"MNIST train images (floor, n={n})", subset, test_features, None, classifier))
    noise = np.clip((rng.standard_normal((args.samples, 28, 28)) + 1) * 127.5, 0, 255).astype(np.uint8)
    rows.append(quality("N(0, I) noise (scale)", noise, test_features, None, classifier))
    runs = [("ddpm", 1000, args.ancestral_samples)] * (args.ancestral_samples > 0)
    runs += [("ddim", int(s), args.samples) for s in args.ddim_steps.split(",") if s]
    for scheduler, steps, n in runs:
        images, seconds = sample(args.model, n, steps, scheduler, args.batch_size, seed=1,
                                 num_threads=args.threads)
        rows.append(quality(f"{scheduler.upper()} {steps} steps", images, test_features, seconds, classifier))
        print(json.dumps(rows[-1]), flush=True)

    report = {"model": args.model, "classifier_test_accuracy": accuracy, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"classifier test accuracy {accuracy:.4f}\n")
    print("| images | n | Frechet distance | mean confidence | classes min-max | s/image |")
    print("|---|---:|---:|---:|---|---:|")
    for row in rows:
        fractions = row["class_fractions"]
        speed = f"{row['seconds_per_image']:.3f}" if row["seconds_per_image"] else "-"
        print(f"| {row['name']} | {row['images']} | {row['frechet_distance']:.3f} | {row['mean_confidence']:.3f} | "
              f"{min(fractions):.1%}-{max(fractions):.1%} | {speed} |")


if __name__ == "__main__":
    main()
