"""The browser sampler (`demo/web/`): its float64 coefficients, its servers (standalone, mounted on a FastAPI app,
a static Space folder), parity with `OnnxDDPMPipeline` in headless Debian Chromium on the same x_T and per-step
noise (bundled digits and MNIST models), the page's limits, and samples drawn in the page.

The browser tests skip only where Debian's `chromium` or onnxruntime-web (`npm ci` in demo/web) is missing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import ReplayedNoise, browser_replay_eps, browser_sample, launch_chromium

from ddpm_plugin.bundled import DIGITS_MODEL, MNIST_MODEL
from ddpm_plugin.demo.backends import MAX_IMAGES, MAX_SEED
from ddpm_plugin.demo.web import site
from ddpm_plugin.export.coefficients import ARRAYS, COEFFICIENTS_FILE, write_coefficients
from ddpm_plugin.export.numpy_sampler import dpm_solver_timesteps
from ddpm_plugin.export.onnx_pipeline import BoundUNet, OnnxDDPMPipeline, OnnxModelError, inference_timesteps
from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion
from ddpm_plugin.trust import UntrustedInputError

PARITY_TOLERANCE = 1e-4
# The bundled 8x8 digits model serves most tests (1000 browser steps in seconds); the parity tests also run the
# 28x28 MNIST model, the default one.
DIGITS_EXPORT = DIGITS_MODEL / "onnx"
MNIST_EXPORT = MNIST_MODEL / "onnx"
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
    _require_ort_web()
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


def _api_page(browser, url: str):
    """A page opened without sampling, for the API tests; no page error may happen while it is open."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "?autorun=0")
    page.evaluate("window.ddpm.ready")
    yield page
    page.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def api_page(browser, page_url):
    yield from _api_page(browser, page_url)


@pytest.fixture(scope="module")
def mnist_api_page(browser):
    server = site.serve(MNIST_EXPORT)  # the bundled export ships its coefficients; the server only reads
    yield from _api_page(browser, f"http://127.0.0.1:{server.server_port}/")
    server.shutdown()


@pytest.fixture(scope="module")
def onnx_pipeline(web_export) -> OnnxDDPMPipeline:
    return OnnxDDPMPipeline.from_pretrained(web_export, provider="cpu", num_threads=1)


@pytest.fixture(scope="module")
def mnist_pipeline() -> OnnxDDPMPipeline:
    return OnnxDDPMPipeline.from_pretrained(MNIST_EXPORT, provider="cpu", num_threads=1)


@pytest.fixture(params=["digits", "mnist"])
def sampler_pair(request) -> tuple:
    """(the page, `OnnxDDPMPipeline`) on the same bundled model, for the parity tests."""
    if request.param == "digits":
        return request.getfixturevalue("api_page"), request.getfixturevalue("onnx_pipeline")
    return request.getfixturevalue("mnist_api_page"), request.getfixturevalue("mnist_pipeline")


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


def test_site_files_refuse_a_model_file_outside_the_export(tmp_path, web_export):
    """The page serves only files of the export: metadata naming a model elsewhere is refused, as the Python
    sampler refuses it, and nothing of the machine is mapped to a URL."""
    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    metadata = json.loads((folder / "ddpm_onnx.json").read_text())
    (folder / "ddpm_onnx.json").write_text(json.dumps({**metadata, "model_file": "../../etc/passwd"}))
    with pytest.raises(OnnxModelError, match="lies outside the export folder"):
        site.site_files(folder)
    with pytest.raises(SystemExit) as exit_info:  # the standalone server: one line, no traceback
        site.main(["--model", str(folder), "--port", "0"])
    assert exit_info.value.code == 1


def _hostile_export(tmp_path: Path, web_export: Path, case: str) -> tuple[Path, Path]:
    """A copy of the export with a link or special file in it, and the secret a link points to."""
    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "the server\'s own file"}')
    if case == "served file is a link":
        (folder / COEFFICIENTS_FILE).unlink()
        (folder / COEFFICIENTS_FILE).symlink_to(secret)
    elif case == "link to /dev/zero":
        (folder / "notes.txt").symlink_to("/dev/zero")
    elif case == "linked folder":
        shutil.rmtree(folder / "scheduler")
        (folder / "scheduler").symlink_to(tmp_path)
    else:
        os.mkfifo(folder / "pipe")
    return folder, secret


HOSTILE_EXPORTS = ["served file is a link", "link to /dev/zero", "linked folder", "fifo"]


@pytest.mark.parametrize("case", HOSTILE_EXPORTS)
def test_a_link_or_special_file_in_the_export_folder_is_refused_at_start_up(tmp_path, web_export, case):
    """The page, its standalone server and the Space writer serve or copy regular files inside the export only;
    a link anywhere in it (or a device, a FIFO) is refused with a message before anything is served."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    folder, secret = _hostile_export(tmp_path, web_export, case)
    refusal = r"is a link; only regular files|is not a regular file"
    with pytest.raises(UntrustedInputError, match=refusal):
        site.site_files(folder)
    app = FastAPI()
    site.mount_page(app, folder)
    answer = TestClient(app).get("/web/model/" + COEFFICIENTS_FILE)
    assert answer.status_code == 503 and re.search(refusal, answer.text) and "secret" not in answer.text
    with pytest.raises(SystemExit) as exit_info:  # the standalone server: one line, no traceback
        site.main(["--model", str(folder), "--port", "0"])
    assert exit_info.value.code == 1
    command = [sys.executable, "-m", "ddpm_plugin.demo.web.site", "--model", str(folder), "--space", str(tmp_path / "space")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and re.search(refusal, done.stderr) and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "space").exists()


def test_a_served_file_replaced_by_a_link_after_start_up_is_not_served(tmp_path, web_export):
    _require_ort_web()
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    app = FastAPI()
    site.mount_page(app, folder)
    client = TestClient(app)
    server = site.serve(folder)
    url = f"http://127.0.0.1:{server.server_port}/model/{COEFFICIENTS_FILE}"
    try:
        assert client.get("/web/model/" + COEFFICIENTS_FILE).status_code == 200 and _get(url)[0] == 200
        (folder / COEFFICIENTS_FILE).unlink()
        (folder / COEFFICIENTS_FILE).symlink_to("/etc/passwd")
        answer = client.get("/web/model/" + COEFFICIENTS_FILE)
        assert answer.status_code == 404 and "root:" not in answer.text
        assert _get(url)[0] == 404
    finally:
        server.shutdown()


def test_site_files_refuse_an_int8_export_that_needs_its_float32_graph_for_small_t(tmp_path, web_export):
    """The page runs one graph at every step; an int8 export with `float32_below_t` would lose its schedule."""
    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    metadata = json.loads((folder / "ddpm_onnx.json").read_text())
    (folder / "ddpm_onnx.json").write_text(json.dumps({**metadata, "float32_below_t": 10}))
    with pytest.raises(OnnxModelError, match="serve a float32 export"):
        site.site_files(folder)


def _require_ort_web() -> None:
    if not (site.ORT_DIST / site.ORT_FILES[0]).is_file():
        pytest.skip(f"onnxruntime-web is not installed: run `npm ci` in {site.WEB_DIR}")


def test_mount_page_serves_the_page_isolated_on_its_path_only(web_export):
    _require_ort_web()
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.get("/")(lambda: {"page": "the app's own"})
    assert site.mount_page(app, web_export) == "/web/"
    client = TestClient(app)
    redirect = client.get("/web", follow_redirects=False)
    assert redirect.status_code in (301, 302, 307) and redirect.headers["location"].endswith("/web/")
    page = client.get("/web/")
    assert page.status_code == 200 and "app.js" in page.text
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"
    metadata = json.loads((web_export / "ddpm_onnx.json").read_text())
    assert client.get("/web/model/ddpm_onnx.json").json() == metadata
    assert client.get("/web/model/../../site.py").status_code == 404
    own = client.get("/")
    assert own.json() == {"page": "the app's own"} and "cross-origin-opener-policy" not in own.headers


def test_mount_page_without_the_files_answers_why_on_its_path(web_export, tmp_path, caplog):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    folder = tmp_path / "onnx"
    shutil.copytree(web_export, folder)
    (folder / COEFFICIENTS_FILE).unlink()
    app = FastAPI()
    assert site.mount_page(app, folder, path="/browser") == "/browser/"
    answer = TestClient(app).get("/browser/")
    assert answer.status_code == 503 and answer.text.startswith("The browser sampler is off:")
    reason = COEFFICIENTS_FILE if (site.ORT_DIST / site.ORT_FILES[0]).is_file() else "npm ci"
    assert reason in answer.text and reason in caplog.text


# --- The page as a static Space. ---


@pytest.fixture(scope="module")
def space(web_export, tmp_path_factory) -> Path:
    _require_ort_web()
    return site.write_space(web_export, tmp_path_factory.mktemp("space") / "space")


def test_space_folder_holds_the_page_runtime_model_and_a_static_space_readme(space, web_export):
    files = sorted(str(path.relative_to(space)) for path in space.rglob("*") if path.is_file())
    page = sorted(site.PAGE_FILES)
    runtime = sorted(f"ort/{name}" for name in site.ORT_FILES)
    model = sorted(f"model/{name}" for name in ("ddpm_onnx.json", COEFFICIENTS_FILE, "model.onnx"))
    assert files == sorted([".gitattributes", "README.md", *page, *runtime, *model])
    assert (space / "model" / "model.onnx").read_bytes() == (web_export / "model.onnx").read_bytes()
    readme = (space / "README.md").read_text()
    front_matter = readme.split("---\n")[1]
    assert "sdk: static\n" in front_matter and "app_file: index.html\n" in front_matter
    assert "cross-origin-embedder-policy: require-corp" in front_matter
    with pytest.raises(FileExistsError, match="not empty"):
        site.write_space(web_export, space)


def test_space_command_writes_the_folder_or_says_why_in_one_line(web_export, tmp_path):
    _require_ort_web()
    command = [sys.executable, "-m", "ddpm_plugin.demo.web.site", "--model", str(web_export), "--space"]
    done = subprocess.run([*command, str(tmp_path / "space")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "a static Space of" in done.stdout, done.stderr
    assert (tmp_path / "space" / "index.html").is_file()
    again = subprocess.run([*command, str(tmp_path / "space")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.startswith("error:") and "not empty" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.fixture(scope="module")
def plain_static_url(space):
    """The Space folder behind Python's plain static server: no cross-origin isolation headers."""
    handler = functools.partial(QuietStaticHandler, directory=str(space))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


class QuietStaticHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.mark.browser
def test_space_folder_on_a_plain_static_server_samples_single_threaded(browser, plain_static_url):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(plain_static_url + "?autorun=0")
    info = page.evaluate("window.ddpm.ready")
    assert info["crossOriginIsolated"] is False and info["threads"] == 1 and info["backend"] == "wasm"
    assert "not cross-origin isolated, so one thread" in page.text_content("#model-info")
    _generate(page, sampler="ddim", steps="5", **{"num-images": "2", "seed": "3"})
    page.wait_for_function("document.querySelectorAll('#gallery a.sample').length === 2")
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert "2 image(s), seed 3, 5 DDIM" in page.text_content("#status")
    page.close()
    assert not errors, errors
    foreign = [url for url in requested if not url.startswith(plain_static_url) and not url.startswith("data:")]
    assert not foreign, foreign


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
    dpm_counts = [n for n in counts if n < 999]  # 999 and 1000 repeat a timestep (or pass T - 1) under some spacings
    for function, python, ns in [("inferenceTimesteps", inference_timesteps, counts),
                                 ("dpmSolverTimesteps", dpm_solver_timesteps, dpm_counts)]:
        actual = api_page.evaluate(
            f"async ([scheduler, counts]) => {{ const m = await import('./sampler.js');"
            f" return counts.map((n) => m.{function}(scheduler, n)); }}",
            [scheduler, ns],
        )
        for n, timesteps in zip(ns, actual):
            assert timesteps == python(scheduler, n).tolist(), (function, n)


@pytest.mark.browser
def test_page_refuses_a_dpmsolver_step_count_that_repeats_a_timestep(api_page):
    values = {"sampler": "dpmsolver++", "varianceType": "fixed_large", "eta": "0", "steps": "1000", "numImages": "1",
              "seed": "0"}
    error = api_page.evaluate("(values) => window.ddpm.checkRequest(values).then(() => null, (e) => e.message)", values)
    assert error.startswith("Steps 1000 is too many for DPM-Solver++ with timestep_spacing 'leading'")
    assert api_page.evaluate("(values) => window.ddpm.checkRequest(values).then((r) => r.numInferenceSteps)",
                             dict(values, steps="10")) == 10


def _inputs(shape: tuple[int, ...], num_inference_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x_T and enough per-step noise for `num_inference_steps` steps."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape, dtype=np.float32)
    return latents, rng.standard_normal(num_inference_steps * int(np.prod(shape)), dtype=np.float32)


def _python_sample(onnx_pipeline, latents, noise, num_inference_steps, **options) -> tuple[np.ndarray, ReplayedNoise]:
    """The final x_0 of `OnnxDDPMPipeline` on x_T = `latents` and the replayed `noise`, and the noise source."""
    final = []
    generator = ReplayedNoise(noise)
    onnx_pipeline(
        latents.shape[0], num_inference_steps, scheduler=options["sampler"], eta=options.get("eta", 0.0),
        variance_type=options.get("varianceType"), generator=generator, latents=latents, progress_bar=False,
        callback=lambda i, t, x_prev, x0: final.append(x_prev) if i == num_inference_steps - 1 else None,
    )
    return final[0], generator


def _parity(sampler_pair, num_inference_steps, seed, **options):
    """max |x_0(browser) - x_0(OnnxDDPMPipeline)| on the same x_T and per-step noise."""
    api_page, onnx_pipeline = sampler_pair
    latents, noise = _inputs((BATCH_SIZE, *onnx_pipeline.image_shape), num_inference_steps, seed)
    result = browser_sample(api_page, latents, noise, numInferenceSteps=num_inference_steps, **options)
    expected, generator = _python_sample(onnx_pipeline, latents, noise, num_inference_steps, **options)
    assert result["unusedNoise"] == noise.size - generator.offset  # both drew the same noise
    assert np.abs(expected).max() > 0.5  # a real image, not a collapsed one
    return float(np.abs(result["sample"] - expected).max())


@pytest.mark.browser
@pytest.mark.parametrize(
    ("num_inference_steps", "options"),
    [
        (1000, {"sampler": "ddpm"}),
        (100, {"sampler": "ddpm", "varianceType": "fixed_small"}),
        (50, {"sampler": "ddim", "eta": 0.0}),
        (50, {"sampler": "ddim", "eta": 1.0}),
        (10, {"sampler": "dpmsolver++"}),
    ],
)
def test_page_loop_is_numpys_bit_for_bit_given_the_same_eps(api_page, onnx_pipeline, monkeypatch, num_inference_steps, options):
    """With the network's eps taken out of the comparison, the page's float64 step rounds to the very float32
    values NumPy does: what remains of the parity tests' difference is the UNet (WASM vs native kernels)."""
    eps = []
    unet_call = BoundUNet.__call__

    def recording_call(self, t):
        noise_pred = unet_call(self, t)
        eps.append(noise_pred.copy())
        return noise_pred

    monkeypatch.setattr(BoundUNet, "__call__", recording_call)
    latents, noise = _inputs((BATCH_SIZE, *onnx_pipeline.image_shape), num_inference_steps, seed=4)
    expected, _ = _python_sample(onnx_pipeline, latents, noise, num_inference_steps, **options)
    replayed = browser_replay_eps(api_page, latents, noise, np.stack(eps), numInferenceSteps=num_inference_steps, **options)
    np.testing.assert_array_equal(replayed, expected)


# What the parity tests measure is the UNet's rounding (WASM vs native kernels; the loop itself is bit-exact, see
# test_page_loop_is_numpys_bit_for_bit_given_the_same_eps) carried through the steps. Measured (2 cores):
# digits 5.4e-7 (DDPM 1000), 2.7e-6 (DDIM 50); MNIST 8.3e-6 (DDPM 1000), 9.7e-5 and 1.3e-5 (DDIM 50, eta 0 and 1).
# DDIM with eta 0 follows an ODE that amplifies a per-call difference most: on MNIST a random 1-ulp change of
# native eps alone moves its result by 3.4e-5, and PyTorch's float32 UNet in the same loop by 2.3e-5.


@pytest.mark.browser
@pytest.mark.slow  # MNIST: 2.5-5 minutes in the browser on a loaded two-core machine
def test_browser_ddpm_1000_steps_matches_onnx_pipeline(sampler_pair):
    assert _parity(sampler_pair, 1000, seed=1, sampler="ddpm") <= PARITY_TOLERANCE


@pytest.mark.browser
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_browser_ddim_50_steps_matches_onnx_pipeline(sampler_pair, eta):
    assert _parity(sampler_pair, 50, seed=2, sampler="ddim", eta=eta) <= PARITY_TOLERANCE


@pytest.mark.browser
@pytest.mark.parametrize("num_inference_steps", [10, 20])
def test_browser_dpmsolver_matches_onnx_pipeline(sampler_pair, num_inference_steps):
    assert _parity(sampler_pair, num_inference_steps, seed=5, sampler="dpmsolver++") <= PARITY_TOLERANCE


@pytest.mark.browser
def test_browser_respaced_ddpm_fixed_small_matches_onnx_pipeline(api_page, onnx_pipeline):
    # 100 of 1000 steps: the respaced posterior the page computes from alpha_bar (`respace` in Python).
    difference = _parity((api_page, onnx_pipeline), 100, seed=3, sampler="ddpm", varianceType="fixed_small")
    assert difference <= PARITY_TOLERANCE


@pytest.mark.browser
def test_page_noise_of_an_image_is_the_same_in_any_batch(api_page):
    """The page samples a request's first image alone and the rest in batches: image k draws from the seed's k-th
    stream in whichever batch it is, so the images of a seed do not depend on how the page batches them."""
    alone, batched = api_page.evaluate(
        """async () => {
          const { batchedNormal, seededNormal } = await import('./sampler.js');
          const perImage = 7;  // odd: each draw discards its last Box-Muller value, in every batching alike
          const alone = [0, 1, 2, 3].map((k) => {
            const stream = seededNormal(5, k);
            return [...stream.standardNormal(perImage), ...stream.standardNormal(perImage)];
          });
          const batch = batchedNormal([0, 1, 2, 3].map((k) => seededNormal(5, k)));
          const first = batch.standardNormal(4 * perImage), second = batch.standardNormal(4 * perImage);
          const batched = [0, 1, 2, 3].map((k) => [...first.subarray(k * perImage, (k + 1) * perImage),
                                                   ...second.subarray(k * perImage, (k + 1) * perImage)]);
          return [alone, batched];
        }"""
    )
    assert alone == batched
    assert len({tuple(values) for values in alone}) == 4  # four different streams
    single = api_page.evaluate(
        "async () => { const m = await import('./sampler.js');"
        " return [[...m.seededNormal(5).standardNormal(6)], [...m.seededNormal(5, 0).standardNormal(6)]]; }"
    )
    assert single[0] == single[1]  # image 0 is the seed's stream as a one-image request draws it


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
    # The page opens on the default sampler of docs/results/dpmsolver_mnist.md, without DDIM's eta.
    assert (page.input_value("#sampler"), page.input_value("#steps")) == ("dpmsolver++", "10")
    assert page.is_hidden("#eta-row") and page.is_hidden("#variance-row")
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
