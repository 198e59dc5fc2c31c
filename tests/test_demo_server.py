"""The demo as users meet it: `ddpm demo` in a subprocess on a free loopback port, driven through its named
API with `gradio_client`, loaded by 16 concurrent clients, and clicked through in headless Debian Chromium.

One server serves the whole module: the tiny test pipeline (fast) and, when it is installed, the bundled digits
model. The browser test skips only where Debian's `chromium` package is missing.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm_plugin.bundled import BUNDLED_MODEL

gradio_client = pytest.importorskip("gradio_client")
psutil = pytest.importorskip("psutil")

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
MAX_IMAGES = 8  # the server's --max-images
STARTUP_SECONDS = 180  # two shared cores: imports, loading, and the ONNX export of each model
LOAD_CLIENTS, LOAD_REQUESTS = 16, 3


@dataclass
class DemoServer:
    url: str
    process: subprocess.Popen
    models: list[str]
    backend: str  # the page's default backend
    tiny_dir: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`ddpm demo` exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"`ddpm demo` did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def demo_server(tiny_pipeline_dir, tmp_path_factory) -> DemoServer:
    root = tmp_path_factory.mktemp("demo")
    folders = ([BUNDLED_MODEL] if (BUNDLED_MODEL / "model_index.json").is_file() else []) + [tiny_pipeline_dir]
    port = free_port()
    env = {
        **os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(root / "gradio"),
        "XDG_CACHE_HOME": str(root / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }
    command = [str(Path(sys.executable).with_name("ddpm")), "demo", "--host", "127.0.0.1", "--port", str(port),
               "--max-images", str(MAX_IMAGES), "--concurrency", "2", "--queue-size", "64", "--threads", "1"]
    for folder in folders:
        command += ["--model", str(folder)]
    log = root / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
        description = gradio_client.Client(url, verbose=False).predict(api_name="/models")
        yield DemoServer(url, process, list(description["models"]), description["backends"][0], tiny_pipeline_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def load_png(path_or_bytes: str | bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(source).convert("L"), dtype=np.float32)


def generate(client, model: str, backend: str, *, sampler="ddim", steps=10, num_images=2, seed=0, eta=0.0):
    return client.predict(model, backend, sampler, "fixed_large", steps, num_images, seed, eta, api_name="/generate")


def test_named_api_lists_models_and_limits(demo_server):
    description = gradio_client.Client(demo_server.url, verbose=False).predict(api_name="/models")
    assert "pipeline" in description["models"]
    assert description["limits"]["max_images"] == MAX_IMAGES
    assert set(description["backends"]) <= {"onnxruntime", "pytorch"} and "pytorch" in description["backends"]
    assert str(demo_server.tiny_dir) not in str(description)  # names only, no server paths


def test_named_api_generates_the_same_images_for_the_same_seed(demo_server):
    client = gradio_client.Client(demo_server.url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/models", "/interpolate", "/bits_per_dim"} <= set(endpoints)
    for backend in {demo_server.backend, "pytorch"}:
        gallery, progression, summary = generate(client, "pipeline", backend, num_images=3, seed=5)
        again, _, _ = generate(client, "pipeline", backend, num_images=3, seed=5)
        assert len(gallery) == 3 and "seed 5" in summary
        images = [load_png(item["image"]) for item in gallery]
        assert all(image.shape == (128, 128) and image.std() > 0 for image in images)
        for image, repeat in zip(images, [load_png(item["image"]) for item in again]):
            np.testing.assert_array_equal(image, repeat)
        assert load_png(progression).std() > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "Steps must be in 1..1000, got 0."),
        ({"steps": 2000}, "Steps must be in 1..1000, got 2000."),
        ({"num_images": MAX_IMAGES + 1}, f"Number of images must be in 1..{MAX_IMAGES}, got {MAX_IMAGES + 1}."),
        ({"seed": -3}, "Seed must be in 0..2147483647, got -3."),
        ({"eta": 2.0}, None),  # the slider refuses it before the callback runs
        ({"model": "/etc/passwd"}, "not in the list of choices"),
        ({"model": "../pipeline"}, "not in the list of choices"),
    ],
)
def test_named_api_rejects_bad_input_with_a_clear_message(demo_server, change, message):
    client = gradio_client.Client(demo_server.url, verbose=False)
    arguments = {"model": "pipeline", "backend": demo_server.backend, **change}
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        generate(client, arguments.pop("model"), arguments.pop("backend"), **arguments)
    if message is not None:
        assert message in str(error.value)
    assert "Traceback" not in str(error.value)


def test_named_api_interpolates_and_measures_bits_per_dim(demo_server, tmp_path):
    client = gradio_client.Client(demo_server.url, verbose=False)
    picture = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((24, 24)) * 255).astype(np.uint8)).save(picture)
    upload = gradio_client.handle_file(str(picture))
    row, summary = client.predict("pipeline", upload, upload, 200, 4, 0, api_name="/interpolate")
    # Image A, four interpolants, image B: six 64x64 tiles with 8-pixel padding.
    assert load_png(row).shape == (64 + 16, 6 * 64 + 7 * 8) and "t = 200" in summary
    fitted, table = client.predict("pipeline", upload, 0, api_name="/bits_per_dim")
    bound = float(table.splitlines()[2].split("|")[1])
    assert load_png(fitted).shape == (128, 128) and 0 < bound < 100
    with pytest.raises(gradio_client.exceptions.AppError, match="Interpolation step t must be in 0..999"):
        client.predict("pipeline", upload, upload, 1000, 4, 0, api_name="/interpolate")


def test_server_serves_no_file_but_its_own_outputs(demo_server):
    weights = next((demo_server.tiny_dir / "unet").glob("*.safetensors"))
    for path in (weights, Path("/etc/passwd"), Path(__file__)):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{demo_server.url}/gradio_api/file={path}", timeout=10)
        assert error.value.code == 403


def test_a_client_cannot_pass_a_server_path_as_a_gallery_picture(demo_server):
    import httpx

    config = httpx.get(f"{demo_server.url}/config").json()
    fn_index = next(k for k, dependency in enumerate(config["dependencies"]) if dependency["api_name"] == "use_sample")
    smuggled = {"image": {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "caption": None}
    session = "smuggler"
    join = httpx.post(f"{demo_server.url}/gradio_api/queue/join",
                      json={"data": [[smuggled]], "fn_index": fn_index, "session_hash": session})
    assert join.status_code == 200
    with httpx.stream("GET", f"{demo_server.url}/gradio_api/queue/data", params={"session_hash": session},
                      timeout=30) as stream:
        completed = next(line for line in stream.iter_lines() if "process_completed" in line)
    assert '"success":false' in completed.replace(" ", "") and "root:" not in completed


@pytest.mark.skipif(not (BUNDLED_MODEL / "model_index.json").is_file(), reason="the bundled model is not built yet")
def test_bundled_model_is_the_default_and_generates_digits(demo_server):
    assert demo_server.models[0] == BUNDLED_MODEL.name
    client = gradio_client.Client(demo_server.url, verbose=False)
    gallery, _, _ = generate(client, BUNDLED_MODEL.name, demo_server.backend, steps=50, num_images=4, seed=0)
    images = np.stack([load_png(item["image"]) for item in gallery])
    assert images.shape == (4, 128, 128) and (images.std(axis=(1, 2)) > 10).all()


@pytest.mark.slow
def test_sixteen_concurrent_clients_are_all_answered_and_memory_stays_bounded(demo_server, test_output_dir):
    server = psutil.Process(demo_server.process.pid)
    generate(gradio_client.Client(demo_server.url, verbose=False), "pipeline", demo_server.backend)  # warm-up
    rss_before = server.memory_info().rss
    clients = [gradio_client.Client(demo_server.url, verbose=False) for _ in range(LOAD_CLIENTS)]
    start_together = threading.Barrier(LOAD_CLIENTS)

    def session(k: int) -> list[tuple[float, bool, bytes | None]]:
        start_together.wait()
        results = []
        for r in range(LOAD_REQUESTS):
            started = time.perf_counter()
            try:
                gallery, _, _ = generate(clients[k], "pipeline", demo_server.backend, seed=r)
                results.append((time.perf_counter() - started, True, load_png(gallery[0]["image"]).tobytes()))
            except Exception as error:
                results.append((time.perf_counter() - started, False, repr(error).encode()))
        return results

    started = time.perf_counter()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        sessions = list(pool.map(session, range(LOAD_CLIENTS)))
    wall = time.perf_counter() - started
    rss_after = server.memory_info().rss
    results = [result for session_results in sessions for result in session_results]
    latencies = np.array([seconds for seconds, _, _ in results])
    failures = sum(not ok for _, ok, _ in results)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    table = (
        f"{LOAD_CLIENTS} clients x {LOAD_REQUESTS} requests, backend {demo_server.backend}, 10 DDIM steps, 2 images "
        f"of the tiny 8x8 model, --concurrency 2 --threads 1, loopback\n\n"
        "| requests | failures | wall (s) | p50 (s) | p90 (s) | p99 (s) | RSS before (MiB) | RSS after (MiB) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {len(results)} | {failures} | {wall:.1f} | {p50:.2f} | {p90:.2f} | {p99:.2f} "
        f"| {rss_before / 2**20:.0f} | {rss_after / 2**20:.0f} |\n"
    )
    (test_output_dir / "demo_load.md").write_text(table)
    print("\n" + table)
    assert len(results) == LOAD_CLIENTS * LOAD_REQUESTS and failures == 0
    assert rss_after <= 1.5 * rss_before
    # Concurrent requests do not disturb each other: equal seeds gave equal pictures in every client.
    for r in range(LOAD_REQUESTS):
        assert len({session_results[r][2] for session_results in sessions}) == 1


@pytest.mark.browser
@pytest.mark.slow
def test_browser_generates_images_and_the_same_seed_repeats_them(demo_server, test_output_dir):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            drive_page(page, demo_server, test_output_dir, sync_api.expect)
        finally:
            browser.close()


def drive_page(page, server: DemoServer, test_output_dir: Path, expect) -> None:
    page.goto(server.url)
    expect(page.locator("#generate")).to_be_visible(timeout=30_000)
    summary = page.locator("#summary")

    def click_generate(seed: int) -> list[np.ndarray]:
        page.locator("#seed input").fill(str(seed))
        page.locator("#generate").click()
        expect(summary).to_contain_text(f"seed {seed},", timeout=120_000)
        images = page.locator("#gallery img")
        expect(images).to_have_count(4)
        return [load_png(page.request.get(images.nth(k).get_attribute("src")).body()) for k in range(4)]

    # 1. The paper's sampler (DDPM, 300 steps here) shows a live progress bar while it runs.
    page.locator("#steps input").fill("300")
    page.locator("#seed input").fill("11")
    page.locator("#generate").click()
    expect(page.locator("#gallery")).to_contain_text("denoising", timeout=60_000)
    expect(summary).to_contain_text("seed 11,", timeout=120_000)
    # 2. DDIM: choosing it sets 50 steps; 20 steps, seeds A, B, A.
    page.get_by_test_id("DDIM-radio-label").click()
    expect(page.locator("#steps input")).to_have_value("50")
    page.locator("#steps input").fill("20")
    first = click_generate(1234)
    other = click_generate(99)
    again = click_generate(1234)
    assert all(image.shape == (128, 128) and image.std() > 0 for image in first)
    for image, repeat in zip(first, again):
        np.testing.assert_array_equal(image, repeat)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    expect(page.locator("#progression img")).to_be_visible()
    page.screenshot(path=str(test_output_dir / "demo_browser.png"), full_page=True)
    # 3. The other tabs take the gallery's samples as their inputs.
    page.get_by_role("tab", name="Interpolate").click()
    page.get_by_role("button", name="Use samples 1 and 2 from the gallery").click()
    expect(page.locator("#image-a img")).to_be_visible(timeout=30_000)
    page.locator("#interpolation-t input").fill("100")
    page.locator("#interpolate").click()
    expect(page.locator("#interpolation-summary")).to_contain_text("t = 100", timeout=120_000)
    page.get_by_role("tab", name="Bits/dim").click()
    page.get_by_role("button", name="Use sample 1 from the gallery").click()
    expect(page.locator("#bpd-image img")).to_be_visible(timeout=30_000)
    page.locator("#bits-per-dim").click()
    expect(page.locator("#bpd-summary")).to_contain_text("bound (bits/dim)", timeout=120_000)
    page.screenshot(path=str(test_output_dir / "demo_browser_bpd.png"), full_page=True)
    page.get_by_role("tab", name="Generate").click()
    # 4. A random seed, then a rejected request: a message in the page, not a traceback.
    page.locator("#random-seed").click()
    expect(page.locator("#seed input")).not_to_have_value("1234")
    page.locator("#steps input").fill("2000")
    page.locator("#generate").click()
    expect(page.get_by_text("Steps must be in 1..1000, got 2000.")).to_be_visible(timeout=30_000)
    assert "Traceback" not in page.content()
