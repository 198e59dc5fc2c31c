"""Images per second of `ddpm sample --output-dir` with 1 process and with N gloo processes, one thread each.

Both runs sample the same images (the script checks they are bitwise equal) of a randomly initialised model
(speed does not depend on training) or of `--model DIR`. The rate is the manifest's: images drawn divided by
the time from the moment all processes have loaded the model to the moment the last shard is written, so
process start-up and loading are left out. On a machine whose cores are busy with other work the figures
measure the neighbours too: the script prints the load average before and after.

    python benchmarks/sample_throughput.py                       # mnist preset, PyTorch, 1 vs 2 processes
    python benchmarks/sample_throughput.py --backend onnxruntime --model ddpm_plugin/bundled/ddpm-digits
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def random_pipeline(preset: str, folder: Path) -> Path:
    from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler

    DDPMPaperPipeline(unet=PaperUNet2DModel.from_preset(preset), scheduler=paper_scheduler(preset)).save_pretrained(folder)
    return folder


def run_sampling(model: Path, output: Path, processes: int, args: argparse.Namespace) -> dict:
    sample = ["-m", "ddpm_plugin.cli", "sample", "--model", str(model), "--output-dir", str(output),
              "--num-images", str(args.num_images), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--backend", args.backend]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, *sample]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), *sample]
        env["ACCELERATE_USE_CPU"] = "1"
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((output / "manifest.json").read_text())


def images(folder: Path) -> np.ndarray:
    from ddpm_plugin.sample_shards import iter_sample_batches

    return np.concatenate(list(iter_sample_batches(folder, progress_bar=False)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: a randomly initialised --preset)")
    parser.add_argument("--preset", default="mnist", help="preset of the random model")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch")
    parser.add_argument("--processes", type=int, default=2, help="processes of the multi-process run")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = Path(args.model) if args.model else random_pipeline(args.preset, scratch / "model")
        load_before = os.getloadavg()
        one = run_sampling(model, scratch / "one", 1, args)
        many = run_sampling(model, scratch / "many", args.processes, args)
        load_after = os.getloadavg()
        identical = np.array_equal(images(scratch / "one"), images(scratch / "many"))
    print(f"model: {args.model or f'random {args.preset} preset'}, backend {args.backend}, {args.num_images} images, "
          f"batch {args.batch_size}, {args.steps} steps, 1 thread per process, {os.cpu_count()} CPUs")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print("| processes | wall time (s) | images/s | speed-up | images identical |")
    print("|---|---|---|---|---|")
    for manifest in (one, many):
        speedup = manifest["images_per_second"] / one["images_per_second"]
        print(f"| {manifest['num_processes']} | {manifest['wall_time_s']:.2f} | {manifest['images_per_second']:.3f} | "
              f"{speedup:.2f}x | {'yes' if identical else 'NO'} |")


if __name__ == "__main__":
    main()
