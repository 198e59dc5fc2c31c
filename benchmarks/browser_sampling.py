"""Browser sampling speed: onnxruntime-web in headless Chromium (WASM, 1 and 2 threads) against
`OnnxDDPMPipeline` (native onnxruntime) on the same model, in the same run; the time from opening the page to
its first DDIM image; what the page downloads; and what storing the weights as fp16 or int8 saves and costs.

On a shared machine the OS takes the core away for tens of milliseconds at a time, which a mean would count
as the sampler's: each case reports the median and the fastest step of its runs, and the CPU time per step
(this process for native, Chromium's renderer processes for the browser: the work done, whoever else runs).
Native and browser runs alternate, so both see the same neighbours.

The weight variants store the weights in a smaller type and convert them back to float32 in the graph, so they
run the same float32 kernels: fp16 is the export as `ddpm export` writes it (every weight that is exactly a
float16 stored as one, with a `Cast`: what the page downloads), fp32 the same graph with those weights stored
as float32 again, int8 the fp32 weights quantized per output channel (symmetric `DequantizeLinear`). Their
quality is measured on the same x_T and noise as the fp32 model: the largest pixel change of the samples and,
for the 8x8 digits model, the mean confidence of a digits classifier on them.

The session-options part times the UNet call alone (`session.run`) under each of SESSION_OPTIONS, to show which
onnxruntime-web options are worth setting in the page.

    python benchmarks/browser_sampling.py                 # the bundled (MNIST) model, about 6-8 minutes
    python benchmarks/browser_sampling.py --model DIR     # a pipeline folder with onnx/, or an export folder
    python benchmarks/browser_sampling.py --parts first-image,weights   # some of the tables (PARTS)
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
from ddpm_plugin.vocabulary import ONNX_METADATA_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the browser helpers are test code
from browser_helpers import ReplayedNoise, browser_sample, launch_chromium  # noqa: E402

THREADS = (1, 2)
QUALITY_SAMPLES = 64  # images per variant for the quality columns
QUALITY_STEPS = 50  # DDIM steps of the quality samples
FIRST_IMAGE_RUNS = 3
PARTS = ("speed", "session-options", "first-image", "weights")  # the tables, in the order printed
TIMEOUT_MS = 600_000  # page loads and waits: a loaded shared machine can take minutes


# --- The model variants. ---


def prepare_export(model: Path, folder: Path) -> Path:
    """A copy of the model's export with its coefficients written beside it."""
    shutil.copytree(resolve_export_folder(model), folder)
    write_coefficients(folder)
    return folder


def float32_variant(export: Path, folder: Path) -> Path:
    """The export with its float16-stored weights (a float16 initializer behind a `Cast` to float32) stored as
    float32 initializers again: the file `ddpm export` wrote before it stored them as float16."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(export, folder)
    model = onnx.load(str(export / "model.onnx"))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    casts = [node for node in graph.node if node.op_type == "Cast" and node.input[0] in initializers
             and initializers[node.input[0]].data_type == onnx.TensorProto.FLOAT16]
    stored = {node.input[0] for node in casts}
    widened = [numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32),
                                       node.output[0]) for node in casts]
    kept = [init for init in graph.initializer if init.name not in stored] + widened
    cast_ids = {id(node) for node in casts}
    nodes = [node for node in graph.node if id(node) not in cast_ids]
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(kept)
    graph.node.extend(nodes)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def int8_variant(export: Path, folder: Path) -> Path:
    """The float32 export with its Conv, MatMul and Gemm weights stored as int8 (symmetric, one scale per output
    channel) and converted back to float32 inside the graph by `DequantizeLinear`."""
    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(export, folder)
    model = onnx.load(str(export / "model.onnx"))
    graph = model.graph
    axes = _output_channel_axes(graph)
    converters, kept = [], []
    for init in graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype != np.float32 or weights.size < 256 or init.name not in axes:
            kept.append(init)
            continue
        axis = axes[init.name]
        reduce_axes = tuple(a for a in range(weights.ndim) if a != axis)
        scale = np.maximum(np.abs(weights).max(axis=reduce_axes) / 127.0, 1e-30).astype(np.float32)
        shape = [1] * weights.ndim
        shape[axis] = -1
        quantized = np.clip(np.round(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
        kept += [numpy_helper.from_array(quantized, f"{init.name}__int8"),
                 numpy_helper.from_array(scale, f"{init.name}__scale"),
                 numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{init.name}__zero")]
        converters.append(helper.make_node(
            "DequantizeLinear", [f"{init.name}__int8", f"{init.name}__scale", f"{init.name}__zero"], [init.name],
            axis=axis,
        ))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = converters + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def _output_channel_axes(graph: Any) -> dict[str, int]:
    """Weight initializer -> its output-channel axis, for the Conv, MatMul and Gemm weights."""
    initializers = {init.name for init in graph.initializer}
    axes = {}
    for node in graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if node.op_type == "Conv":
            axes[node.input[1]] = 0
        elif node.op_type == "MatMul":
            axes[node.input[1]] = 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes[node.input[1]] = 0 if trans_b else 1
    return axes


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
        pipe = OnnxDDPMPipeline.from_pretrained(export, provider="cpu", num_threads=threads)
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


# onnxruntime-web session options tried for the page (the page uses the first); `batch` stands for the batch size.
SESSION_OPTIONS = {
    "graphOptimizationLevel all (the page's)": {"graphOptimizationLevel": "all"},
    "+ freeDimensionOverrides batch": {"graphOptimizationLevel": "all", "freeDimensionOverrides": {"batch": "batch"}},
    "+ executionMode parallel": {"graphOptimizationLevel": "all", "executionMode": "parallel"},
    "+ no memory pattern, no arena": {"graphOptimizationLevel": "all", "enableMemPattern": False,
                                      "enableCpuMemArena": False},
    "+ intra-op threads do not spin": {"graphOptimizationLevel": "all",
                                       "extra": {"session": {"intra_op.allow_spinning": "0"}}},
}
SESSION_RUN_JS = """async ({options, batch, runs}) => {
  const ort = await import('./ort/ort.wasm.min.mjs');  // the page's own module: its WASM and threads
  const bytes = new Uint8Array(await (await fetch('model/model.onnx')).arrayBuffer());
  const metadata = await (await fetch('model/ddpm_onnx.json')).json();
  if (options.freeDimensionOverrides) options = {...options, freeDimensionOverrides: {batch}};
  const session = await ort.InferenceSession.create(bytes, {executionProviders: ['wasm'], ...options});
  const size = metadata.sample_size;
  const x = new Float32Array(batch * metadata.in_channels * size * size).map(() => Math.random() * 2 - 1);
  const times = [];
  for (let i = 0; i < runs; i++) {
    const [sample, timestep] = metadata.input_names;
    const feeds = {[sample]: new ort.Tensor('float32', x, [batch, metadata.in_channels, size, size]),
                   [timestep]: new ort.Tensor('int64', new BigInt64Array(batch).fill(500n), [batch])};
    const started = performance.now();
    await session.run(feeds);
    times.push(performance.now() - started);
  }
  await session.release();
  return times;
}"""


def session_options_table(browser: Any, url: str, batch_sizes: list[int], runs: int, repeats: int) -> list[list[str]]:
    """ms of the UNet call alone (`session.run`) under each of SESSION_OPTIONS, 2 WASM threads: the median and
    the fastest of `repeats` sessions of `runs` calls, the option sets interleaved."""
    page = open_page(browser, f"{url}?autorun=0&threads={THREADS[-1]}")
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for name, options in SESSION_OPTIONS.items():
            for batch in batch_sizes:
                result = page.evaluate(SESSION_RUN_JS, {"options": options, "batch": batch, "runs": runs})
                times.setdefault((name, batch), []).extend(result[3:])  # the first calls warm the session up
    page.close()
    return [[name, str(batch), f"{statistics.median(values):.2f}", f"{min(values):.2f}"]
            for (name, batch), values in times.items()]


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


def digits_confidence(images: np.ndarray) -> float | None:
    """Mean top-class probability of a logistic regression trained on scikit-learn's digits (8x8 only)."""
    if images.shape[1:] != (8, 8, 1):
        return None
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    classifier = LogisticRegression(max_iter=5000).fit(digits.data, digits.target)
    return float(classifier.predict_proba(images.reshape(len(images), -1) * 16.0).max(axis=1).mean())


def quality_samples(export: Path, latents: np.ndarray, noise: np.ndarray) -> np.ndarray:
    pipe = OnnxDDPMPipeline.from_pretrained(export, provider="cpu", num_threads=1)
    return pipe(len(latents), QUALITY_STEPS, scheduler="ddim", eta=1.0, generator=ReplayedNoise(noise),
                latents=latents, progress_bar=False).images


def variant_table(browser: Any, variants: dict[str, Path], url_of: dict[str, str], steps: int) -> list[list[str]]:
    shape = (QUALITY_SAMPLES, *OnnxDDPMPipeline.from_pretrained(variants["fp32"], provider="cpu").image_shape)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(QUALITY_STEPS * int(np.prod(shape)), dtype=np.float32)
    reference = quality_samples(variants["fp32"], latents, noise)
    rows = []
    for name, export in variants.items():
        images = reference if name == "fp32" else quality_samples(export, latents, noise)
        model = export / "model.onnx"
        raw, compressed = download_bytes([model])
        page = open_page(browser, f"{url_of[name]}?autorun=0&threads=1")
        times, cpu = browser_step_ms(page, (1, *shape[1:]), steps)
        page.close()
        confidence = digits_confidence(images)
        change = np.abs(images - reference)
        rows.append([
            name, f"{raw / 1e6:.2f}", f"{compressed / 1e6:.2f}", f"{min(times):.2f}", f"{cpu:.2f}",
            f"{change.max() * 255:.1f}",
            f"{change.mean() * 255:.2f}", "-" if confidence is None else f"{confidence:.3f}",
        ])
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


def print_weights(browser: Any, variants: dict[str, Path], url_of: dict[str, str], steps: int) -> None:
    print(f"\nWeights stored as (fp16: the export as written, what the page downloads; browser: 1 thread, batch 1, "
          f"{steps} DDIM steps; quality: {QUALITY_SAMPLES} samples, DDIM {QUALITY_STEPS} steps, eta 1, the same "
          "noise as fp32):\n")
    rows = variant_table(browser, variants, url_of, steps)
    print(markdown(["weights", "model (MB)", "gzipped (MB)", "browser min (ms/step)", "browser CPU (ms/step)",
                    "max |Δ| vs fp32 (of 255)", "mean |Δ| (of 255)", "digits confidence"], rows))


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
        export = prepare_export(resolve_model(args.model), Path(tmp) / "fp16")  # as written: what the page serves
        fp32 = float32_variant(export, Path(tmp) / "fp32")
        variants = {"fp32": fp32, "fp16": export, "int8": int8_variant(fp32, Path(tmp) / "int8")}
        servers = {name: site.serve(folder) for name, folder in variants.items()}
        url_of = {name: f"http://127.0.0.1:{server.server_port}/" for name, server in servers.items()}
        browser = launch_chromium(playwright)
        metadata = (export / ONNX_METADATA_FILE).read_text()
        print(f"model: {resolve_model(args.model)} ({' '.join(metadata.split())[:160]}...)")
        print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; Chromium {browser.version}, onnxruntime-web "
              f"{json.loads((site.ORT_DIST.parent / 'package.json').read_text())['version']}")
        if "speed" in parts:
            print(f"\nms per DDIM step ({args.repeats} runs of {args.steps} steps); native = OnnxDDPMPipeline on "
                  "onnxruntime's CPU provider, browser = the page's loop on onnxruntime-web WASM (SIMD):\n")
            rows = speed_table(browser, url_of["fp16"], export, batch_sizes, args.steps, args.repeats)
            print(markdown(["threads", "batch", "native wall (median / min)", "native CPU",
                            "browser wall (median / min)", "browser CPU", "browser / native (min)", "(CPU)"], rows))
        if "session-options" in parts:
            print(f"\nms per UNet call alone (session.run; {THREADS[-1]} WASM threads, {args.repeats} sessions of "
                  f"{args.steps} calls per case, interleaved), by onnxruntime-web session options:\n")
            rows = session_options_table(browser, url_of["fp16"], batch_sizes, args.steps, args.repeats)
            print(markdown(["session options", "batch", "median (ms)", "min (ms)"], rows))
        if "first-image" in parts:
            print_first_image(browser, url_of["fp16"], export)
        if "weights" in parts:
            print_weights(browser, variants, url_of, args.steps)
        browser.close()
        for server in servers.values():
            server.shutdown()


if __name__ == "__main__":
    main()
