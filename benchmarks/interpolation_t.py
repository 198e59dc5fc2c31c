"""How deep an interpolation may noise its endpoints and still give them back: for each t of a small grid, held-out
digits are noised to x_t (Eq. 4) and decoded from t as the demo's interpolation decodes its lambda = 0 and 1 ends;
a classifier then says how often the reconstruction keeps the input's class. The deepest t at which the agreement
stays at or above `--keep` is the model's default interpolation step, which the demo reads from
`demo/interpolation_defaults.json`.

    OMP_NUM_THREADS=1 python benchmarks/interpolation_t.py            # writes docs/results/interpolation_t.json

Both models are judged on held-out images they did not train on: MNIST by the bundled digit classifier on MNIST's
test set; the 8x8 digits model on the digits test split, by the label of the nearest image of the digits training
split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_plugin.bundled import DIGITS_MODEL, MNIST_MODEL
from ddpm_plugin.sampling import load_pipeline, with_scheduler
from ddpm_plugin.trust import file_sha256, write_json
from ddpm_plugin.pipelines.diffusion_ops import q_sample

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "interpolation_t.json"
DEFAULTS = Path(__file__).resolve().parents[1] / "demo" / "interpolation_defaults.json"
GRID = (50, 100, 200, 300, 400, 500)


def reconstruct(pipe, images: np.ndarray, timestep: int, steps: int, seed: int) -> np.ndarray:
    """`images` (uint8 NHWC) noised to x_t and decoded from t with the ancestral sampler, as uint8 NHWC."""
    generator = torch.Generator().manual_seed(seed)
    x_start = pipe.preprocess(torch.as_tensor(images))
    timestep = pipe.schedule_timestep(timestep, steps)
    noise = torch.randn(x_start.shape, generator=generator)
    x_t = q_sample(pipe.diffusion, x_start, torch.full((len(images),), timestep), noise)
    decoded = pipe(batch_size=len(images), generator=generator, num_inference_steps=steps, output_type="np",
                   latents=x_t, start_timestep=timestep).images
    return np.clip(np.rint(decoded * 255), 0, 255).astype(np.uint8)


def mnist_judge(num_images: int, seed: int):
    from ddpm_plugin.classifier import classify, load_classifier
    from ddpm_plugin.data import dataset_images

    classifier = load_classifier()
    images, _ = dataset_images("mnist", (1, 28, 28), num_images, seed, split="test")
    with torch.no_grad():
        labels = classify(classifier, images)[1].argmax(1)

    def judge(reconstructions: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return classify(classifier, reconstructions)[1].argmax(1)

    return images, labels, judge


def digits_judge(num_images: int, seed: int):
    from sklearn.datasets import load_digits

    from ddpm_plugin.data import digits_split

    digits = load_digits()
    images = np.rint(digits.images / 16.0 * 255).astype(np.uint8)[..., None]
    test = np.random.default_rng(seed).permutation(digits_split("test"))[:num_images]
    train = digits_split("train")
    reference = images[train].reshape(len(train), -1).astype(np.float32)

    def judge(reconstructions: np.ndarray) -> np.ndarray:
        flat = reconstructions.reshape(len(reconstructions), -1).astype(np.float32)
        distances = ((flat[:, None, :] - reference[None]) ** 2).sum(-1)
        return digits.target[train][distances.argmin(1)]

    return images[test], judge(images[test]), judge


def measure(name: str, folder: Path, judge_factory, args: argparse.Namespace) -> dict:
    pipe = with_scheduler(load_pipeline(folder), "ddpm")
    pipe.set_progress_bar_config(disable=True)
    images, labels, judge = judge_factory(args.num_images, args.seed)
    rows = []
    for timestep in GRID:
        start = time.perf_counter()
        kept = float((judge(reconstruct(pipe, images, timestep, args.steps, args.seed)) == labels).mean())
        rows.append({"t": timestep, "class_kept": round(kept, 3), "seconds": round(time.perf_counter() - start, 1)})
        print(name, rows[-1], flush=True)
    deepest = max((row["t"] for row in rows if row["class_kept"] >= args.keep), default=GRID[0])
    weights = file_sha256(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return {"folder": folder.name, "weights_sha256": weights, "images": args.num_images, "rows": rows,
            "default_t": deepest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="ancestral sampling schedule the decode walks")
    parser.add_argument("--keep", type=float, default=0.9, help="share of reconstructions that must keep their class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    models = {"mnist": measure("mnist", MNIST_MODEL, mnist_judge, args),
              "digits": measure("digits", DIGITS_MODEL, digits_judge, args)}
    write_json(RESULTS, {
        "what": "share of held-out digits (MNIST: test set; digits: test split) whose class survives "
                "noising to x_t and decoding from t (the lambda = 0/1 ends of an interpolation); default_t is the "
                "deepest t of the grid with at least `keep` kept",
        "judge": {"mnist": "bundled mnist-classifier", "digits": "nearest image of the digits training split"},
        "sampler": f"ddpm ancestral, {args.steps}-step schedule", "keep": args.keep, "seed": args.seed,
        "models": models,
    })
    table = json.loads(DEFAULTS.read_text()) if DEFAULTS.is_file() else {}
    for result in models.values():
        kept = next(row["class_kept"] for row in result["rows"] if row["t"] == result["default_t"])
        table[result["weights_sha256"]] = {"model": result["folder"], "timestep": result["default_t"], "class_kept": kept}
    # A model that was not measured starts at the shallowest measured default.
    table["fallback"] = {"timestep": min(result["default_t"] for result in models.values())}
    write_json(DEFAULTS, table)
    print(f"wrote {RESULTS} and {DEFAULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
