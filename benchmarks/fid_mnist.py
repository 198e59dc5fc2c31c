"""FID and KID of a 28x28 MNIST model with the standard Inception network (`ddpm_plugin.inception`), offline.

The reference is a random subset of the MNIST test images. Beside the model's samples (a `ddpm sample --output-dir`
folder) it scores, at the same number of images n: a random subset of the training images (the floor: what
a perfect model would get at this n) and N(0, I) noise images (a ceiling for scale). Images are scored as the model
sees them (28x28 gray, repeated to three channels by the network's input step). KID is torchmetrics'
`KernelInceptionDistance` on the same features. It also reports the seconds per 1,000 images of feature extraction.

Features are cached per chunk of images in `--cache` (plain `.npy`), so a stopped run resumes where it stopped, and
sets can be extracted in separate runs (`--sets test,train,noise` while the samples are still being drawn):

    ddpm sample --output-dir samples/ddim50 --scheduler ddim --steps 50 --num-images 1000 --batch-size 50
    OMP_NUM_THREADS=1 python benchmarks/fid_mnist.py --samples samples/ddim50 --num-images 1000 --json fid.json

The data are read from `$DDPM_MNIST_DIR` (default `../shared/data/mnist` beside the checkout).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ddpm_plugin.classifier import frechet_distance
from ddpm_plugin.inception import NUM_FEATURES, FidInception
from ddpm_plugin.sample_shards import iter_sample_batches, read_manifest
from ddpm_plugin.trust import load_npz, read_json, write_atomically, write_json

MNIST_DIR = Path(os.environ.get("DDPM_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
SETS = ("generated", "test", "train", "noise")
KID_SUBSETS = 100  # torchmetrics' default
KID_SUBSET_SIZE = 1000  # torchmetrics' default, lowered to n when n is smaller
TIMINGS = "timings.json"  # seconds per image of each extracted chunk, in the cache


def mnist_subset(split: str, num_images: int, seed: int) -> np.ndarray:
    """`num_images` MNIST images of `split` drawn at random (the files are sorted by label), uint8 [N, 28, 28]."""
    images = load_npz(MNIST_DIR / f"mnist_{split}.npz")["images"]
    return images[np.random.default_rng(seed).permutation(len(images))[:num_images]]


def noise_images(num_images: int, seed: int) -> np.ndarray:
    """N(0, I) in the model's -1..1 scale, as uint8 images (the samples' scale), [N, 28, 28]."""
    noise = np.random.default_rng(seed).standard_normal((num_images, 28, 28))
    return np.clip((noise + 1) * 127.5, 0, 255).astype(np.uint8)


def set_images(name: str, args: argparse.Namespace) -> np.ndarray:
    if name == "generated":
        return np.concatenate(list(iter_sample_batches(args.samples, args.num_images, progress_bar=False)))[..., 0]
    if name == "noise":
        return noise_images(args.num_images, args.seed)
    return mnist_subset(name, args.num_images, args.seed + (name == "train"))


def set_features(name: str, network: FidInception, args: argparse.Namespace, timings: dict[str, float]) -> np.ndarray:
    """The features of set `name`, chunk by chunk from the cache, extracting the chunks it lacks (their seconds per
    image go into `timings`, kept in the cache's timings.json)."""
    images = set_images(name, args)
    if len(images) < args.num_images:
        raise SystemExit(f"{name}: only {len(images)} images, --num-images is {args.num_images}.")
    chunks = []
    for start in range(0, args.num_images, args.chunk):
        path = args.cache / f"{name}-seed{args.seed}-{start:06d}-{min(start + args.chunk, args.num_images):06d}.npy"
        if not path.is_file():
            batch = torch.from_numpy(images[start : start + args.chunk][:, None])
            started = time.perf_counter()
            with torch.inference_mode():
                features = network(batch).double().numpy()
            timings[path.name] = (time.perf_counter() - started) / len(batch)
            write_atomically(path, lambda file, features=features: np.save(file, features))
            write_json(args.cache / TIMINGS, timings)
            print(f"{name} {start + len(batch)}/{args.num_images}: {timings[path.name]:.3f} s/image", flush=True)
        chunks.append(np.load(path, allow_pickle=False))
    return np.concatenate(chunks)


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, seed: int) -> tuple[float, float]:
    """torchmetrics' KID (mean, std over subsets) of two feature sets; with n at most the subset size every subset
    is the whole set, so the std is 0 and only the mean means something."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(KID_SUBSET_SIZE, len(real), len(fake))
    # The features are computed already: the metric's network is never run, its feature lists are filled directly.
    with warnings.catch_warnings():  # its warnings about the feature buffer and compute before update
        warnings.simplefilter("ignore")
        kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=KID_SUBSETS, subset_size=subset_size)
    kid.real_features.append(torch.from_numpy(real))
    kid.fake_features.append(torch.from_numpy(fake))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", help="a complete `ddpm sample --output-dir` folder of the model's 28x28 samples")
    parser.add_argument("--num-images", type=int, default=1000, help="images per set (n)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--cache", type=Path, default=Path("test-output/fid_mnist_features"), help="feature cache")
    parser.add_argument("--chunk", type=int, default=50, help="images per network pass and per cached chunk")
    parser.add_argument("--seed", type=int, default=0, help="the MNIST subsets, the noise, KID's subsets")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    sets = [name.strip() for name in args.sets.split(",") if name.strip()]
    if set(sets) - set(SETS) or ("generated" in sets and not args.samples):
        parser.error(f"--sets must name some of {', '.join(SETS)}, and generated needs --samples; got {args.sets!r}.")
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    network = FidInception()
    timings = read_json(args.cache / TIMINGS) if (args.cache / TIMINGS).is_file() else {}
    features = {name: set_features(name, network, args, timings) for name in dict.fromkeys(["test", *sets])}
    labels = {"generated": "model samples", "train": "MNIST train images (floor)", "noise": "N(0, I) noise (ceiling)",
              "test": "MNIST test images (the reference itself)"}
    if args.samples:
        run = read_manifest(args.samples)["run"]
        labels["generated"] = f"model samples ({run['scheduler']}, {run['num_inference_steps']} steps, {run['backend']})"
    rows = []
    for name in sets:
        kid_mean, kid_std = kernel_inception_distance(features["test"], features[name], args.seed)
        rows.append({"name": labels[name], "set": name, "images": args.num_images,
                     "fid": frechet_distance(features[name], features["test"]), "kid": kid_mean, "kid_std": kid_std})
    extraction = {"seconds_per_1000_images": 1000 * float(np.median(list(timings.values()))) if timings else None,
                  "chunks_timed": len(timings), "threads": args.threads, "batch": args.chunk}
    print(f"Inception {network.name}, {NUM_FEATURES} features, sha256 {network.sha256}; reference: {args.num_images} "
          f"MNIST test images; torch threads {args.threads}")
    print("\n| images | n | FID | KID (x1e3) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['images']} | {row['fid']:.2f} | {1e3 * row['kid']:.2f} ± {1e3 * row['kid_std']:.2f} |")
    if timings:
        print(f"\nfeature extraction: {extraction['seconds_per_1000_images']:.0f} s per 1,000 images (median of "
              f"{len(timings)} chunks of {args.chunk}, {args.threads} thread(s))")
    if args.json:
        write_json(args.json, {"network": network.name, "network_sha256": network.sha256, "num_features": NUM_FEATURES,
                               "reference": f"{args.num_images} MNIST test images (seed {args.seed})",
                               "samples": args.samples, "rows": rows, "extraction": extraction})


if __name__ == "__main__":
    main()
