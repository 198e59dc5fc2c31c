"""Browser sampling speed: onnxruntime-web in headless Chromium (WASM, 1 and 2 threads) against
`OnnxDDPMPipeline` (native onnxruntime) on the same model, in the same run; the time from opening the page to
its first image; what the page downloads; and one image per few-step sampler (DDIM against DPM-Solver++).

On a shared machine the OS takes the core away for tens of milliseconds at a time, which a mean would count
as the sampler's: each case reports the median and the fastest step of its runs, and the CPU time per step
(this process for native, Chromium's renderer processes for the browser: the work done, whoever else runs).
Native and browser runs alternate, so both see the same neighbours.

    python benchmarks/browser_sampling.py                 # the bundled (MNIST) model, about 6-8 minutes
    python benchmarks/browser_sampling.py --model DIR     # a pipeline folder with onnx/, or an export folder
    python benchmarks/browser_sampling.py --parts first-image             # some of the tables (PARTS)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ddpm_plugin.bundled import resolve_model
from ddpm_plugin.demo.web import site
from ddpm_plugin.export.coefficients import write_coefficients
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline, resolve_export_folder
from ddpm_plugin.export.sampler import open_sampler
from ddpm_plugin.vocabulary import ONNX_METADATA_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the browser helpers are test code
from browser_helpers import browser_sample, launch_chromium  # noqa: E402

THREADS = (1, 2)
FIRST_IMAGE_RUNS = 3
PARTS = ("speed", "first-image", "samplers")  # the tables, in the order printed
# The page's two few-step choices, each at the step count of its quality row (docs/results/dpmsolver_mnist.md).
SAMPLER_CASES = (("ddim", 50), ("dpmsolver++", 10))
TIMEOUT_MS = 600_000  # page loads and waits: a loaded shared machine can take minutes


def prepare_export(model: Path, folder: Path) -> Path:
    """A copy of the model's export with its coefficients written beside it."""
    shutil.copytree(resolve_export_folder(model), folder)
    write_coefficients(folder)
    return folder


def download_bytes(files: list[Path]) -> tuple[int, int]:
    """(raw, gzip -6) bytes of `files`."""
    raw = sum(path.stat().st_size for path in files)
    compressed = sum(len(gzip.compress(path.read_bytes(), compresslevel=6)) for path in files)
    return raw, compressed


# --- Measurements. ---


def renderer_cpu_seconds() -> float:
    """User + system CPU time of the Chromium renderer processes started from this process."""
    import psutil

    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            if "--type=renderer" in process.cmdline():
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.Error:  # a process that ended meanwhile
            pass
    return total


def native_step_ms(pipe: OnnxDDPMPipeline, batch_size: int, steps: int) -> tuple[list[float], float]:
    """Wall ms of each DDIM step of `OnnxDDPMPipeline` (UNet call plus NumPy update), and CPU ms per step."""
    stamps = [time.perf_counter()]
    cpu = time.process_time()
    pipe(batch_size, steps, scheduler="ddim", seed=0, progress_bar=False,
         callback=lambda *args: stamps.append(time.perf_counter()))
    return list(np.diff(stamps) * 1e3), (time.process_time() - cpu) * 1e3 / steps


def browser_step_ms(page: Any, shape: tuple[int, ...], steps: int) -> tuple[list[float], float]:
    """Wall ms of each DDIM step of the page's loop (UNet call plus JS update), and renderer CPU ms per step."""
    latents = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    cpu = renderer_cpu_seconds()
    result = browser_sample(page, latents, np.zeros(0, np.float32), sampler="ddim", numInferenceSteps=steps)
    return result["stepMs"], (renderer_cpu_seconds() - cpu) * 1e3 / steps


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.evaluate("window.ddpm.ready")
    return page


def speed_table(browser: Any, url: str, export: Path, batch_sizes: list[int], steps: int, repeats: int) -> list[list[str]]:
    rows = []
    for threads in THREADS:
        pipe = open_sampler(export, "onnxruntime", num_threads=threads, progress_bar=False).pipe
        page = open_page(browser, f"{url}?autorun=0&threads={threads}")
        native_step_ms(pipe, 1, 5), browser_step_ms(page, (1, *pipe.image_shape), 5)  # warm-up
        for batch_size in batch_sizes:
            native, web = ([], []), ([], [])
            for _ in range(repeats):
                for (times, cpu), result in ((native, native_step_ms(pipe, batch_size, steps)),
                                             (web, browser_step_ms(page, (batch_size, *pipe.image_shape), steps))):
                    times.extend(result[0])
                    cpu.append(result[1])
            (n_median, n_min, n_cpu), (w_median, w_min, w_cpu) = (
                (statistics.median(times), min(times), statistics.median(cpu)) for times, cpu in (native, web)
            )
            rows.append([
                str(threads), str(batch_size), f"{n_median:.2f} / {n_min:.2f}", f"{n_cpu:.2f}",
                f"{w_median:.2f} / {w_min:.2f}", f"{w_cpu:.2f}", f"{w_min / n_min:.1f}x", f"{w_cpu / n_cpu:.1f}x",
            ])
        page.close()
    return rows


def first_image(browser: Any, url: str, threads: int) -> tuple[dict[str, float], list[str]]:
    """The page's timings in ms from opening it in a fresh browser context (nothing cached): onnxruntime-web
    loaded (`runtime`), the model downloaded (`modelFetched`), the session ready (`ready`), the first image and
    all images of the page's default request (DDIM, 50 steps, 4 images) on screen; and the URLs it requested."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{url}?threads={threads}", wait_until="commit")
    page.wait_for_function("window.ddpm && window.ddpm.timings.allImages !== null")
    timings = page.evaluate("window.ddpm.timings")
    context.close()
    return timings, requested


def sampler_table(browser: Any, url: str, shape: tuple[int, ...], repeats: int) -> list[list[str]]:
    """Wall seconds from asking a ready page for one image to having it, per sampler of `SAMPLER_CASES` (runs
    alternate between the samplers, so both see the same neighbours), and each one's ratio to the first."""
    latents = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    rows = []
    for threads in THREADS:
        page = open_page(browser, f"{url}?autorun=0&threads={threads}")
        browser_sample(page, latents, np.zeros(0, np.float32), sampler="ddim", numInferenceSteps=5)  # warm-up
        seconds: dict[str, list[float]] = {sampler: [] for sampler, _ in SAMPLER_CASES}
        for _ in range(repeats):
            for sampler, steps in SAMPLER_CASES:
                started = time.perf_counter()
                browser_sample(page, latents, np.zeros(0, np.float32), sampler=sampler, numInferenceSteps=steps)
                seconds[sampler].append(time.perf_counter() - started)
        page.close()
        baseline = statistics.median(seconds[SAMPLER_CASES[0][0]])
        for sampler, steps in SAMPLER_CASES:
            median = statistics.median(seconds[sampler])
            rows.append([str(threads), f"{sampler} {steps}", f"{median:.3f}", f"{min(seconds[sampler]):.3f}",
                         f"{baseline / median:.1f}x"])
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def print_first_image(browser: Any, url: str, export: Path) -> None:
    print(f"\nOpening the page to its first image (fresh context, nothing cached; the page's default request: "
          f"DDIM 50 steps, 4 images, the first sampled alone; median of {FIRST_IMAGE_RUNS} loads):\n")
    rows, requested = [], []
    keys = ("runtime", "modelFetched", "ready", "firstImage", "allImages")
    for threads in THREADS:
        runs = [first_image(browser, url, threads) for _ in range(FIRST_IMAGE_RUNS)]
        requested = runs[-1][1]
        rows.append([str(threads)] + [f"{statistics.median(r[0][key] for r in runs) / 1e3:.2f}" for key in keys])
    print(markdown(["threads", "runtime loaded (s)", "model downloaded (s)", "session ready (s)", "first image (s)",
                    "all 4 images (s)"], rows))
    files = site.site_files(export)
    fetched = [files[address.removeprefix(url).split("?")[0]] for address in requested if address.startswith(url)]
    raw, compressed = download_bytes(fetched)
    model_raw, model_compressed = download_bytes([export / "model.onnx"])
    print(f"\nDownload: {len(fetched)} files, {raw / 1e6:.2f} MB ({compressed / 1e6:.2f} MB gzipped), of which the "
          f"model {model_raw / 1e6:.2f} MB ({model_compressed / 1e6:.2f} MB gzipped).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder with onnx/, or an export (default: bundled)")
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps per timed run (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (default: %(default)s)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated parts to run, of: %(default)s (default: all)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts must be a comma-separated subset of {','.join(PARTS)}, got '{args.parts}'")
    from playwright.sync_api import sync_playwright

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        export = prepare_export(resolve_model(args.model), Path(tmp) / "export")  # as written: what the page serves
        server = site.serve(export)
        url = f"http://127.0.0.1:{server.server_port}/"
        browser = launch_chromium(playwright)
        metadata = (export / ONNX_METADATA_FILE).read_text()
        print(f"model: {resolve_model(args.model)} ({' '.join(metadata.split())[:160]}...)")
        print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; Chromium {browser.version}, onnxruntime-web "
              f"{json.loads((site.ORT_DIST.parent / 'package.json').read_text())['version']}")
        if "speed" in parts:
            print(f"\nms per DDIM step ({args.repeats} runs of {args.steps} steps); native = OnnxDDPMPipeline on "
                  "onnxruntime's CPU provider, browser = the page's loop on onnxruntime-web WASM (SIMD):\n")
            rows = speed_table(browser, url, export, batch_sizes, args.steps, args.repeats)
            print(markdown(["threads", "batch", "native wall (median / min)", "native CPU",
                            "browser wall (median / min)", "browser CPU", "browser / native (min)", "(CPU)"], rows))
        if "first-image" in parts:
            print_first_image(browser, url, export)
        if "samplers" in parts:
            shape = open_sampler(export, "onnxruntime", progress_bar=False).image_shape
            print(f"\nOne image on a ready page, per sampler (median and fastest of {args.repeats} runs, seconds; "
                  f"speed-up against {' '.join(map(str, SAMPLER_CASES[0]))}):\n")
            print(markdown(["threads", "sampler, steps", "median (s)", "fastest (s)", "sooner"],
                           sampler_table(browser, url, shape, args.repeats)))
        browser.close()
        server.shutdown()


if __name__ == "__main__":
    main()
