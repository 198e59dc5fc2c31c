"""The browser sampler (`demo/web/`): its float64 coefficients, its server, parity with `OnnxDDPMPipeline` in
headless Debian Chromium on the same x_T and per-step noise, the page's limits, and samples drawn in the page.

The browser tests skip only where Debian's `chromium` or onnxruntime-web (`npm ci` in demo/web) is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ddpm_plugin.bundled import BUNDLED_MODEL
from ddpm_plugin.demo.backends import MAX_IMAGES, MAX_SEED
from ddpm_plugin.demo.web import site
from ddpm_plugin.demo.web.testing import ReplayedNoise, browser_sample, launch_chromium
from ddpm_plugin.export.coefficients import ARRAYS, COEFFICIENTS_FILE, write_coefficients
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline, inference_timesteps
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion

PARITY_TOLERANCE = 1e-4
# The bundled 8x8 digits model: fast enough for 1000 browser steps in a test. (On the 28x28 MNIST model the
# browser and the native sampler differ by 2.9e-4 after 1000 DDPM steps; DDIM 50 stays within 1e-4.)
DIGITS_EXPORT = BUNDLED_MODEL.parent / "ddpm-digits" / "onnx"
BATCH_SIZE = 2
PAGE_TIMEOUT_MS = 300_000  # Playwright's 30 s default is too short on a loaded two-core machine


@pytest.fixture(scope="module")
def web_export(tmp_path_factory) -> Path:
    """The bundled digits export with its coefficients written beside it (in a copy: tests never write into
    the package)."""
    folder = tmp_path_factory.mktemp("web") / "onnx"
    shutil.copytree(DIGITS_EXPORT, folder)
    write_coefficients(folder)
    return folder


@pytest.fixture(scope="module")
def page_url(web_export):
    if not (site.ORT_DIST / site.ORT_FILES[0]).is_file():
        pytest.skip(f"onnxruntime-web is not installed: run `npm ci` in {site.WEB_DIR}")
    server = site.serve(web_export)
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(page_url):
    """A browser context of headless Chromium (`.new_page()` as on a browser)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        yield context
        browser.close()


@pytest.fixture(scope="module")
def api_page(browser, page_url):
    """One page, loaded without sampling, for the API tests."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_url + "?autorun=0")
    page.evaluate("window.ddpm.ready")
    yield page
    page.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def onnx_pipeline(web_export) -> OnnxDDPMPipeline:
    return OnnxDDPMPipeline.from_pretrained(web_export, provider="cpu", num_threads=1)


# --- The coefficients file. ---


def test_coefficients_json_holds_the_float64_arrays_bit_for_bit(web_export):
    document = json.loads((web_export / COEFFICIENTS_FILE).read_text())
    config = json.loads((web_export / "scheduler" / "scheduler_config.json").read_text())
    diffusion = GaussianDiffusion.from_config(config)
    for name in ARRAYS:
        np.testing.assert_array_equal(np.array(document[name], dtype=np.float64), getattr(diffusion, name), err_msg=name)
    assert document["scheduler"]["num_train_timesteps"] == diffusion.num_timesteps == 1000
    assert document["scheduler"]["variance_type"] == config["variance_type"]
    assert document["scheduler"]["timestep_spacing"] == config["timestep_spacing"]


def test_write_coefficients_names_the_missing_scheduler_config(web_export, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"scheduler_config\.json is missing"):
        write_coefficients(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no ONNX export"):
        write_coefficients(tmp_path / "empty")


# --- The server: only the page's files, always cross-origin isolated. ---


def _get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def test_server_serves_only_the_page_files_with_isolation_headers(page_url):
    status, headers = _get(page_url + "ort/ort-wasm-simd-threaded.wasm")
    assert status == 200 and headers["Content-Type"] == "application/wasm"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    for path in ("model/scheduler/scheduler_config.json", "../../../etc/passwd", "%2e%2e/site.py", "site.py",
                 "node_modules/onnxruntime-web/package.json", "ort/ort.min.js.map"):
        status, headers = _get(page_url + path)
        assert status == 404, path
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"


def test_site_files_say_how_to_get_what_is_missing(tmp_path, web_export):
    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    (folder / COEFFICIENTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"python -m ddpm_plugin\.export\.coefficients"):
        site.site_files(folder)


def test_asgi_app_serves_the_page_under_a_mount(web_export):
    if not (site.ORT_DIST / site.ORT_FILES[0]).is_file():
        pytest.skip(f"onnxruntime-web is not installed: run `npm ci` in {site.WEB_DIR}")
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    client = TestClient(Starlette(routes=[Mount("/web", app=site.asgi_app(web_export))]))
    redirect = client.get("/web", follow_redirects=False)
    assert redirect.status_code in (301, 302, 307) and redirect.headers["location"].endswith("/web/")
    page = client.get("/web/")
    assert page.status_code == 200 and "app.js" in page.text
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    metadata = json.loads((web_export / "ddpm_onnx.json").read_text())
    assert client.get("/web/model/ddpm_onnx.json").json() == metadata
    assert client.get("/web/model/../../site.py").status_code == 404


# --- The page in Chromium. ---


@pytest.mark.browser
def test_page_loads_everything_from_its_own_host_cross_origin_isolated(browser, page_url):
    context = browser.browser.new_context()  # nothing cached: every file is requested
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(page_url + "?autorun=0")
    info = page.evaluate("window.ddpm.ready")
    context.close()
    assert info["crossOriginIsolated"] is True
    assert info["backend"] == "wasm"  # headless with --disable-gpu has no WebGPU adapter: the fallback
    assert info["threads"] >= 1
    assert any(url.endswith("ort-wasm-simd-threaded.wasm") for url in requested)
    foreign = [url for url in requested if not url.startswith(page_url) and not url.startswith("data:")]
    assert not foreign, foreign


@pytest.mark.browser
@pytest.mark.parametrize(
    "config",
    [
        {"timestep_spacing": "leading", "steps_offset": 0},
        {"timestep_spacing": "leading", "steps_offset": 1},
        {"timestep_spacing": "linspace", "steps_offset": 0},
        {"timestep_spacing": "trailing", "steps_offset": 0},
    ],
)
def test_page_timesteps_equal_python(api_page, config):
    scheduler = {"num_train_timesteps": 1000, **config}
    counts = [1, 2, 3, 7, 50, 99, 100, 333, 999, 1000]
    actual = api_page.evaluate(
        "async ([scheduler, counts]) => { const m = await import('./sampler.js');"
        " return counts.map((n) => m.inferenceTimesteps(scheduler, n)); }",
        [scheduler, counts],
    )
    for n, timesteps in zip(counts, actual):
        assert timesteps == inference_timesteps(scheduler, n).tolist(), n


def _parity(api_page, onnx_pipeline, num_inference_steps, seed, **options):
    """max |x_0(browser) - x_0(OnnxDDPMPipeline)| on the same x_T and per-step noise."""
    shape = (BATCH_SIZE, *onnx_pipeline.image_shape)
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(num_inference_steps * int(np.prod(shape)), dtype=np.float32)
    result = browser_sample(api_page, latents, noise, numInferenceSteps=num_inference_steps, **options)

    final = []
    generator = ReplayedNoise(noise)
    onnx_pipeline(
        BATCH_SIZE, num_inference_steps, scheduler=options["sampler"], eta=options.get("eta", 0.0),
        variance_type=options.get("varianceType"), generator=generator, latents=latents, progress_bar=False,
        callback=lambda i, t, x_prev, x0: final.append(x_prev) if i == num_inference_steps - 1 else None,
    )
    assert result["unusedNoise"] == noise.size - generator.offset  # both drew the same noise
    assert np.abs(final[0]).max() > 0.5  # a real image, not a collapsed one
    return float(np.abs(result["sample"] - final[0]).max())


@pytest.mark.browser
@pytest.mark.slow
def test_browser_ddpm_1000_steps_matches_onnx_pipeline(api_page, onnx_pipeline):
    assert _parity(api_page, onnx_pipeline, 1000, seed=1, sampler="ddpm") <= PARITY_TOLERANCE


@pytest.mark.browser
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_browser_ddim_50_steps_matches_onnx_pipeline(api_page, onnx_pipeline, eta):
    assert _parity(api_page, onnx_pipeline, 50, seed=2, sampler="ddim", eta=eta) <= PARITY_TOLERANCE


@pytest.mark.browser
def test_browser_respaced_ddpm_fixed_small_matches_onnx_pipeline(api_page, onnx_pipeline):
    # 100 of 1000 steps: the respaced posterior the page computes from alpha_bar (`respace` in Python).
    difference = _parity(api_page, onnx_pipeline, 100, seed=3, sampler="ddpm", varianceType="fixed_small")
    assert difference <= PARITY_TOLERANCE


@pytest.mark.browser
def test_page_limits_are_the_gradio_demos(api_page):
    info = api_page.evaluate("window.ddpm.ready")
    assert info["limits"]["maxImages"] == MAX_IMAGES
    assert info["limits"]["maxSeed"] == MAX_SEED
    assert api_page.get_attribute("#steps", "max") == "1000"
    assert api_page.get_attribute("#num-images", "max") == str(MAX_IMAGES)


def _generate(page, **controls: str) -> None:
    for control, value in controls.items():
        if control == "sampler":
            page.select_option("#sampler", value)
        else:
            page.fill(f"#{control}", value)
    page.click("#generate")


@pytest.mark.browser
def test_page_generates_samples_and_progression_then_rejects_bad_controls_keeping_them(
    browser, page_url, test_output_dir
):
    page = browser.new_page()
    page.goto(page_url + "?autorun=0")
    page.evaluate("window.ddpm.ready")
    _generate(page, sampler="ddim", steps="20", **{"num-images": "4", "seed": "7"})
    page.wait_for_function("document.querySelectorAll('#gallery a.sample').length === 4")
    page.wait_for_function("!document.querySelector('#generate').disabled")
    status = page.text_content("#status")
    assert "4 image(s), seed 7, 20 DDIM" in status and "t = " in status
    samples = page.eval_on_selector_all(
        "#gallery a.sample", "(links) => links.map((a) => [a.download, a.href.slice(0, 22), a.firstChild.width])"
    )
    assert samples[0] == ["ddpm-seed7-ddim20-1.png", "data:image/png;base64,", 128]  # 8 px x 16, nearest
    # Fig. 6: 8 snapshot columns, an x_t and an x_0 row per image (4 images), 1-px gaps, 8 px tiles x 8.
    width, height = page.eval_on_selector("#progression-link canvas", "(c) => [c.width, c.height]")
    assert (width, height) == ((8 * 9 + 1) * 8, (8 * 9 + 1) * 8)
    page.screenshot(path=str(test_output_dir / "browser_sampling.png"), full_page=True)

    gallery = page.inner_html("#gallery")
    for controls, message in [
        ({"steps": "0"}, "Steps must be in 1..1000, got 0."),
        ({"steps": "1001"}, "Steps must be in 1..1000, got 1001."),
        ({"steps": "2.5"}, "Steps must be a whole number in 1..1000"),
        ({"steps": "20", "num-images": "17"}, f"Number of images must be in 1..{MAX_IMAGES}, got 17."),
        ({"num-images": "4", "seed": "-1"}, f"Seed must be in 0..{MAX_SEED}, got -1."),
        ({"seed": str(MAX_SEED + 1)}, f"Seed must be in 0..{MAX_SEED}, got {MAX_SEED + 1}."),
        ({"seed": "7", "eta": "1.5"}, "Eta must be a number in 0..1"),
    ]:
        _generate(page, **controls)
        assert page.text_content("#status").startswith(message), controls
        assert page.get_attribute("#status", "role") == "alert"
        assert page.inner_html("#gallery") == gallery  # nothing lost
    page.close()


def test_coefficients_command_writes_the_file_or_says_why_in_one_line(web_export, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    (folder / COEFFICIENTS_FILE).unlink()
    command = [sys.executable, "-m", "ddpm_plugin.export.coefficients"]
    done = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (folder / COEFFICIENTS_FILE).is_file(), done.stderr
    failed = subprocess.run([*command, str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert failed.stderr.strip().startswith("error:") and "does not exist" in failed.stderr
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
