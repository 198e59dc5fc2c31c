"""The demo as users meet it: `ddpm demo` in a subprocess on a free loopback port, driven through its named
API with `gradio_client`, attacked (`demo_attacks.py`: decompression bombs, junk uploads, oversized bodies, wrong
types, server paths as pictures, too few values, paths out of `/web/`), loaded by 50 concurrent clients, and
clicked through in headless Debian Chromium.

One server serves the whole module: the tiny test pipeline (fast) and, when it is installed, the bundled MNIST
model. The browser test skips only where Debian's `chromium` package is missing.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gradio_client
import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

import demo_attacks as attacks
from ddpm_plugin.bundled import BUNDLED_MODEL, DIGITS_MODEL
from ddpm_plugin.demo.backends import GALLERY_PIXELS, display_scale
from ddpm_plugin.demo.uploads import NOT_AN_UPLOAD


CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
MAX_IMAGES = 8  # the server's --max-images
STARTUP_SECONDS = 600  # two shared (and often busy) cores: imports, loading, and the ONNX export of each model
LOAD_CLIENTS = 50


@dataclass
class DemoServer:
    url: str
    process: subprocess.Popen
    models: list[str]
    backend: str  # the tiny pipeline's first backend: the page's default where the pipeline runs on it
    tiny_dir: Path
    log: Path  # the server's stdout and stderr
    files: Path  # GRADIO_TEMP_DIR, under which each run makes its own file folder


def start_server(port: int, folders: list[Path], root: Path, *flags: str) -> tuple[str, subprocess.Popen, Path]:
    """`ddpm demo` on `port` with `root/gradio` as GRADIO_TEMP_DIR; (url, process, log) once it answers.
    The servers of a session share one ONNX export cache, beside `root`."""
    env = {
        **os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(root / "gradio"),
        "XDG_CACHE_HOME": str(root.parent / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }
    command = [str(Path(sys.executable).with_name("ddpm")), "demo", "--host", "127.0.0.1", "--port", str(port), *flags]
    for folder in folders:
        command += ["--model", str(folder)]
    log = root / f"server-{port}.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
    except BaseException:
        stop_server(process)
        raise
    return url, process, log


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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
def demo_server(tiny_pipeline_dir, tmp_path_factory, free_port) -> DemoServer:
    root = tmp_path_factory.mktemp("demo")
    folders = ([BUNDLED_MODEL] if (BUNDLED_MODEL / "model_index.json").is_file() else []) + [tiny_pipeline_dir]
    url, process, log = start_server(free_port(), folders, root, "--max-images", str(MAX_IMAGES),
                                     "--concurrency", "2", "--queue-size", "64", "--threads", "1")
    try:
        description = gradio_client.Client(url, verbose=False).predict(api_name="/models")
        onnx = description["models"]["pipeline"]["onnxruntime"] == "available"
        yield DemoServer(url, process, list(description["models"]), description["backends"][0] if onnx else "pytorch",
                         tiny_pipeline_dir, log, root / "gradio")
    finally:
        stop_server(process)


def load_png(path_or_bytes: str | bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(source).convert("L"), dtype=np.float32)


def generate(client, model: str, backend: str, *, sampler="ddim", steps=10, num_images=2, seed=0, eta=0.0):
    return client.predict(model, backend, sampler, "fixed_large", steps, num_images, seed, eta, api_name="/generate")


def test_named_api_lists_models_and_limits(demo_server):
    description = gradio_client.Client(demo_server.url, verbose=False).predict(api_name="/models")
    assert "pipeline" in description["models"]
    assert description["limits"]["max_images"] == MAX_IMAGES
    assert set(description["backends"]) <= {"onnxruntime", "openvino", "pytorch"} and "pytorch" in description["backends"]
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
        ({"eta": 2.0}, "Eta must be a number in 0..1, got 2.0."),
        ({"model": "/etc/passwd"}, "Unknown model '/etc/passwd'; choose one of:"),
        ({"model": "../pipeline"}, "Unknown model '../pipeline'; choose one of:"),
        # Wrong types from an API client (issue 11, item 6): a message, never a rounding or a traceback.
        ({"steps": float("nan")}, "Steps must be a whole number in 1..1000, got nan."),
        ({"steps": float("inf")}, "Steps must be a whole number in 1..1000, got inf."),
        ({"steps": 2.5}, "Steps must be a whole number in 1..1000, got 2.5."),
        ({"steps": True}, "Steps must be a whole number in 1..1000, got True."),
        ({"num_images": "two"}, "Number of images must be a whole number in 1..8, got 'two'."),
        ({"num_images": [2]}, "Number of images must be a whole number in 1..8, got [2]."),
        ({"seed": float("nan")}, "Seed must be a whole number in 0..2147483647, got nan."),
        ({"seed": "7"}, "Seed must be a whole number in 0..2147483647, got '7'."),
        ({"eta": float("nan")}, "Eta must be a number in 0..1, got nan."),
        ({"eta": "0.5"}, "Eta must be a number in 0..1, got '0.5'."),
        ({"eta": [0.5]}, "Eta must be a number in 0..1, got [0.5]."),
    ],
)
def test_named_api_rejects_bad_input_with_a_clear_message(demo_server, change, message):
    """Sent as the page's client sends it (`gradio_client` cannot encode NaN); the answer is the error event."""
    arguments = {"model": "pipeline", "backend": demo_server.backend, "steps": 10, "images": 2, **change}
    arguments["images"] = arguments.pop("num_images", arguments["images"])
    logged = demo_server.log.stat().st_size
    answer = attacks.generate(demo_server.url, arguments.pop("model"), **arguments)
    assert answer.status == 400 and json.loads(answer.text)["error"].startswith(message)
    assert "Traceback" not in demo_server.log.read_text()[logged:]  # and none in the server's log


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


@pytest.fixture(scope="module")
def server_pictures(demo_server, tmp_path_factory) -> dict[str, object]:
    return attacks.server_pictures(tmp_path_factory.mktemp("secrets"), demo_server.log.parent)


@pytest.mark.parametrize(("api_name", "input_name"), [("bits_per_dim", "Image"), ("interpolate", "Image A")])
def test_a_picture_input_reads_no_server_file_and_says_nothing_about_the_path(
    demo_server, server_pictures, api_name, input_name
):
    """Absolute or relative, existing, unreadable or missing, plain or tagged as Gradio's file object: one
    message, the same for every path, so the answer is no file-existence oracle either."""
    logged = demo_server.log.stat().st_size
    for name, picture in server_pictures.items():
        answer = attacks.picture_call(demo_server.url, "pipeline", api_name, picture)
        assert answer.status == 400, (name, answer)
        assert json.loads(answer.text)["error"] == NOT_AN_UPLOAD.format(name=input_name), (name, answer)
    assert "Traceback" not in demo_server.log.read_text()[logged:]


def test_too_few_arguments_get_a_message_that_names_the_inputs_and_log_no_traceback(demo_server):
    logged = demo_server.log.stat().st_size
    answer = attacks.too_few_arguments(demo_server.url, "pipeline")
    assert answer.status == 400
    assert json.loads(answer.text)["error"] == (
        "/generate takes 8 values (model, backend, sampler, variance_type, steps, num_images, seed, eta), got 1."
    )
    assert "Traceback" not in demo_server.log.read_text()[logged:]


def test_the_browser_page_is_served_beside_the_gradio_page_and_linked_from_it(demo_server):
    page = httpx.get(f"{demo_server.url}/web/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert page.headers["cross-origin-opener-policy"] == "same-origin"  # isolated: WASM threads
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"
    coefficients = httpx.get(f"{demo_server.url}/web/model/diffusion_coefficients.json", timeout=30)
    assert coefficients.status_code == 200 and "alphas_cumprod" in coefficients.text
    gradio_page = httpx.get(demo_server.url, timeout=30)
    assert "cross-origin-opener-policy" not in gradio_page.headers  # only the page's own path is isolated
    config = httpx.get(f"{demo_server.url}/config", timeout=30).text
    assert "sample in your own browser" in config and "(/web/)" in config


def test_server_serves_no_file_but_its_own_outputs(demo_server):
    weights = next((demo_server.tiny_dir / "unet").glob("*.safetensors"))
    for path in (weights, Path("/etc/passwd"), Path(__file__)):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{demo_server.url}/gradio_api/file={path}", timeout=10)
        assert error.value.code == 403


@pytest.mark.parametrize("picture", ["/etc/passwd (tagged)", "absolute picture (tagged)", "absolute picture"])
def test_a_client_cannot_pass_a_server_path_as_a_gallery_picture(demo_server, server_pictures, picture):
    config = httpx.get(f"{demo_server.url}/config").json()
    fn_index = next(k for k, dependency in enumerate(config["dependencies"]) if dependency["api_name"] == "use_sample")
    smuggled = {"image": server_pictures[picture], "caption": None}
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
    side = client.predict(api_name="/models")["models"][BUNDLED_MODEL.name]["image_shape"][-1]
    shown = side * display_scale(side, GALLERY_PIXELS)  # upscaled by a whole factor to at least 128 pixels
    assert images.shape == (4, shown, shown) and (images.std(axis=(1, 2)) > 10).all()


# --- Hostile requests (issue 11, items 4-6). ---


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> bytes:
    return attacks.decompression_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png").read_bytes()


def files_named(server: DemoServer, name: str) -> list[Path]:
    return [path for path in server.files.rglob(name) if path.is_file()]


@pytest.mark.parametrize("name", sorted(attacks.JUNK_UPLOADS))
def test_an_upload_that_is_not_a_picture_is_refused_and_not_kept(demo_server, name):
    answer = attacks.upload(demo_server.url, {name: attacks.JUNK_UPLOADS[name]})
    assert answer.status == 415
    assert answer.text == f"The upload {name!r} is not a picture; upload a PNG, JPEG, WEBP, GIF, BMP image."
    assert files_named(demo_server, name) == []


def test_a_decompression_bomb_is_refused_before_it_is_decoded(demo_server, bomb):
    server = psutil.Process(demo_server.process.pid)
    rss = server.memory_info().rss
    uploaded, _ = attacks.bits_per_dim_of_upload(demo_server.url, "pipeline", bomb, name="bomb.png")
    assert uploaded.status == 413
    assert uploaded.text.startswith("The upload 'bomb.png' is 13,000 x 13,000 pixels; the demo takes pictures of at most")
    assert server.memory_info().rss - rss < 100 * 2**20  # decoded, it would take 507 MB
    assert files_named(demo_server, "bomb.png") == []


@pytest.mark.parametrize(
    ("attack", "status", "message"),
    [
        (lambda url: attacks.oversized_json(url), 413, "Request body too large: the demo takes at most 65,536 bytes"),
        (lambda url: attacks.generate(url, "m" * 5 * 2**20), 413, "Request body too large"),
        (lambda url: attacks.upload(url, {f"{k}.png": b"\0" * 1_990_000 for k in range(3)}), 413,
         "Request body too large: the demo takes at most 2,162,688 bytes"),
    ],
    ids=["30 MB JSON", "5 MB model name", "three 1.9 MB files"],
)
def test_request_bodies_are_bounded(demo_server, attack, status, message):
    answer = attack(demo_server.url)
    assert answer.status == status and message in answer.text and len(answer.text) < 200


def test_an_upload_is_served_until_its_request_ends_then_deleted(demo_server):
    uploaded = attacks.upload(demo_server.url, {"digit.png": attacks.small_picture(seed=9)})
    assert uploaded.status == 200
    (path,) = json.loads(uploaded.text)
    preview = httpx.get(f"{demo_server.url}/gradio_api/file={path}")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"  # the page shows it
    answer = attacks.call(demo_server.url, "bits_per_dim", ["pipeline", attacks.file_data(path), 0])
    assert answer.status == 200 and "bound (bits/dim)" in answer.text
    assert not Path(path).exists()
    assert httpx.get(f"{demo_server.url}/gradio_api/file={path}").status_code == 403
    again = attacks.call(demo_server.url, "bits_per_dim", ["pipeline", attacks.file_data(path), 0])
    assert again.status == 400 and json.loads(again.text)["error"] == NOT_AN_UPLOAD.format(name="Image")


@pytest.mark.slow
def test_a_restarted_server_serves_nothing_of_the_earlier_run(tiny_pipeline_dir, tmp_path, free_port):
    url, process, _ = start_server(free_port(), [tiny_pipeline_dir], tmp_path, "--no-onnx", "--threads", "1")
    try:
        (path,) = json.loads(attacks.upload(url, {"kept.png": attacks.small_picture()}).text)
        assert httpx.get(f"{url}/gradio_api/file={path}").status_code == 200
    finally:
        stop_server(process)
    assert not Path(path).exists() and list((tmp_path / "gradio").glob("ddpm-demo-*")) == []  # the run's folder is gone
    url, process, _ = start_server(free_port(), [tiny_pipeline_dir], tmp_path, "--no-onnx", "--threads", "1")
    try:
        assert httpx.get(f"{url}/gradio_api/file={path}").status_code == 403
    finally:
        stop_server(process)


def capped_memory(limit: int = 8 * 2**30):
    """A `preexec_fn` capping the child's address space: a regression that reads a device cannot take the machine."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("case", ["unet/notes.txt -> /dev/zero", "unet/extra.bin is a FIFO",
                                  "onnx/diffusion_coefficients.json -> a server file"])
def test_a_link_or_special_file_in_a_served_model_folder_stops_the_demo_at_start_up(
    tiny_pipeline_dir, tmp_path, free_port, case
):
    """Refused with one line before anything is read or served (the link to /dev/zero was read until
    MemoryError while hashing the folder for its ONNX export)."""
    folder = tmp_path / "model"
    shutil.copytree(DIGITS_MODEL if case.startswith("onnx/") else tiny_pipeline_dir, folder)
    name = case.split()[0]
    if case.endswith("FIFO"):
        os.mkfifo(folder / name)
    else:
        secret = tmp_path / "secret.json"
        secret.write_text("{}")
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to("/dev/zero" if "/dev/zero" in case else secret)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1"}
    command = [str(Path(sys.executable).with_name("ddpm")), "demo", "--model", str(folder), "--host", "127.0.0.1",
               "--port", str(free_port()), "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, preexec_fn=capped_memory())
    kind = "is not a regular file (a device, FIFO or socket)" if case.endswith("FIFO") else "is a link"
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"ddpm demo: error: {folder / name} {kind}; only regular files are read."
    assert "Traceback" not in done.stderr


# --- Load: 50 concurrent clients, 24 of them hostile. ---


def load_plan(url: str, backend: str, bomb: bytes, pictures: dict[str, object]) -> list[tuple[str, bool, object]]:
    """(kind, valid, request) for each of the 50 clients."""
    plan: list[tuple[str, bool, object]] = []
    for k in range(16):
        plan.append(("generate", True, lambda k=k: attacks.generate(url, "pipeline", backend=backend, seed=k % 4)))
    plan.append(("GET /web/", True, lambda: attacks.web_get(url, "")))
    plan.append(("GET /web/model/diffusion_coefficients.json", True,
                 lambda: attacks.web_get(url, "model/diffusion_coefficients.json")))
    for k in range(8):
        plan.append(("bits/dim of an upload", True,
                     lambda k=k: attacks.bits_per_dim_of_upload(url, "pipeline", attacks.small_picture(seed=k))))
    for k in range(8):
        plan.append(("13,000 x 13,000 PNG bomb", False,
                     lambda k=k: attacks.bits_per_dim_of_upload(url, "pipeline", bomb, name=f"bomb{k}.png")[0]))
    for name, content in attacks.JUNK_UPLOADS.items():
        plan.append((f"junk upload ({name})", False, lambda n=name, c=content: attacks.upload(url, {n: c})))
    plan.append(("30 MB JSON body", False, lambda: attacks.oversized_json(url)))
    plan.append(("three 1.9 MB files", False, lambda: attacks.upload(url, {f"{k}.png": b"\0" * 1_990_000 for k in range(3)})))
    plan.append(("steps NaN", False, lambda: attacks.generate(url, "pipeline", backend=backend, steps=float("nan"))))
    plan.append(("seed 'abc'", False, lambda: attacks.generate(url, "pipeline", backend=backend, seed="abc")))
    plan.append(("too few values to /generate", False, lambda: attacks.too_few_arguments(url, "pipeline")))
    for name, api_name in (("absolute picture", "bits_per_dim"), ("relative picture", "interpolate"),
                           ("/etc/shadow (tagged)", "bits_per_dim")):
        plan.append((f"server path as a picture ({name})", False,
                     lambda n=name, a=api_name: attacks.picture_call(url, "pipeline", a, pictures[n])))
    for path in attacks.WEB_ATTACKS:
        plan.append((f"GET /web/{path}", False, lambda p=path: attacks.web_get(url, p)))
    assert len(plan) == LOAD_CLIENTS
    return plan


REFUSALS = ("is not a picture", "pixels; the demo takes pictures of at most", "Request body too large",
            "must be a whole number", NOT_AN_UPLOAD.format(name="Image"), NOT_AN_UPLOAD.format(name="Image A"),
            "/generate takes 8 values", "Not found", "Not Found")
# Nothing of the server's files may show in a refusal: its folders, a file's content, a secret's name.
REVEALING = ("/tmp", "/etc", "root:", "secret", str(Path(__file__).resolve().parent.parent))


@pytest.mark.slow
def test_many_clients_with_bombs_junk_and_server_paths_all_answered_and_memory_stays_bounded(
    demo_server, bomb, server_pictures, test_output_dir
):
    server = psutil.Process(demo_server.process.pid)
    url, backend = demo_server.url, demo_server.backend
    attacks.generate(url, "pipeline", backend=backend)  # warm-up: both model endpoints once
    attacks.bits_per_dim_of_upload(url, "pipeline", attacks.small_picture(seed=99))
    idle_rss = peak_rss = server.memory_info().rss
    logged = demo_server.log.stat().st_size  # earlier tests' refused attacks may have logged gradio's own refusal
    plan = load_plan(url, backend, bomb, server_pictures)
    done = threading.Event()

    def watch_memory() -> None:
        nonlocal peak_rss
        while not done.is_set():
            peak_rss = max(peak_rss, server.memory_info().rss)
            time.sleep(0.01)

    start_together = threading.Barrier(LOAD_CLIENTS)

    def client(k: int) -> tuple[float, object]:
        start_together.wait()
        started = time.perf_counter()
        answer = plan[k][2]()
        return time.perf_counter() - started, answer

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            results = list(pool.map(client, range(LOAD_CLIENTS)))
    finally:
        done.set()
        watcher.join()
    wall = time.perf_counter() - started
    rows, pictures = [], {}
    for k, ((kind, valid, _), (seconds, answer)) in enumerate(zip(plan, results)):
        final = answer[1] if isinstance(answer, tuple) else answer  # bits/dim: (upload, request)
        if valid:
            assert final.status == 200, (kind, final)
            if kind == "generate":
                gallery = json.loads(final.text)["data"][0]
                image = httpx.get(gallery[0]["image"]["url"]).content
                pictures.setdefault(k % 4, []).append(load_png(image).tobytes())  # the seed of client k
        else:
            assert final.status in (400, 404, 413, 415), (kind, final)
            assert any(refusal in final.text for refusal in REFUSALS), (kind, final)
            assert not any(revealing in final.text for revealing in REVEALING), (kind, final)
        rows.append((kind, valid, final.status, seconds))
    assert all(len(set(same_seed)) == 1 for same_seed in pictures.values())  # equal seeds, equal pictures
    assert peak_rss <= 1.5 * idle_rss, (idle_rss, peak_rss)
    kinds = sorted({row[0] for row in rows}, key=[row[0] for row in rows].index)
    table = (
        f"{LOAD_CLIENTS} concurrent clients, one request each, backend {backend}, tiny 8x8 model, 10 DDIM steps x 2 "
        "images, --concurrency 2 --threads 1, loopback\n\n| request | clients | answers | slowest (s) |\n|---|---:|---|---:|\n"
        + "".join(
            f"| {kind} | {sum(r[0] == kind for r in rows)} | "
            f"{', '.join(sorted({('served ' if r[1] else 'refused ') + str(r[2]) for r in rows if r[0] == kind}))} | "
            f"{max(r[3] for r in rows if r[0] == kind):.1f} |\n"
            for kind in kinds
        )
        + f"\nwall {wall:.1f} s; server RSS idle {idle_rss / 2**20:.0f} MiB, peak {peak_rss / 2**20:.0f} MiB "
        f"({peak_rss / idle_rss:.2f}x)\n"
    )
    (test_output_dir / "demo_load.md").write_text(table)
    print("\n" + table)
    assert "Traceback" not in demo_server.log.read_text()[logged:]


@pytest.mark.browser
@pytest.mark.slow
def test_browser_generates_images_and_the_same_seed_repeats_them(demo_server, test_output_dir):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    from playwright import sync_api

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

    # 1. The page opens on DPM-Solver++ (10 steps); the paper's sampler (DDPM, 300 steps here) shows a live
    #    progress bar while it runs.
    expect(page.locator("#steps input")).to_have_value("10")
    page.get_by_test_id("DDPM (ancestral, paper)-radio-label").click()
    page.locator("#steps input").fill("300")
    page.locator("#seed input").fill("11")
    page.locator("#generate").click()
    try:
        expect(page.locator("#gallery")).to_contain_text("denoising", timeout=60_000)
        expect(summary).to_contain_text("seed 11,", timeout=120_000)
    except AssertionError as error:  # say what the page said, and the server's last words
        shown = page.locator(".toast-wrap, .toast-body, #gallery").all_inner_texts()
        log = server.log.read_text()[-3000:] if server.log.exists() else ""
        raise AssertionError(f"{error}\npage: {shown}\nserver log: {log}") from None
    # 2. DDIM: choosing it sets 50 steps; 20 steps, seeds A, B, A.
    page.get_by_test_id("DDIM-radio-label").click()
    expect(page.locator("#steps input")).to_have_value("50")
    page.locator("#steps input").fill("20")
    first = click_generate(1234)
    other = click_generate(99)
    again = click_generate(1234)
    description = gradio_client.Client(server.url, verbose=False).predict(api_name="/models")
    side = description["models"][server.models[0]]["image_shape"][-1]
    shown = side * display_scale(side, GALLERY_PIXELS)  # the default model's images, upscaled to >= 128 pixels
    assert all(image.shape == (shown, shown) and image.std() > 0 for image in first)
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
    # A file that is not a picture, uploaded through the page, is refused with a message there.
    notes = test_output_dir / "notes.png"
    notes.write_bytes(attacks.JUNK_UPLOADS["notes.png"])
    page.locator("#bpd-image input[type=file]").set_input_files(str(notes))
    expect(page.get_by_text("'notes.png' is not a picture").first).to_be_visible(timeout=30_000)
    page.get_by_role("tab", name="Generate").click()
    # 4. A random seed, then a rejected request: a message in the page, not a traceback.
    page.locator("#random-seed").click()
    expect(page.locator("#seed input")).not_to_have_value("1234")
    page.locator("#steps input").fill("2000")
    page.locator("#generate").click()
    expect(page.get_by_text("Steps must be in 1..1000, got 2000.")).to_be_visible(timeout=30_000)
    assert "Traceback" not in page.content()
