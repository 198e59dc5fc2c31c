"""The package as users get it: a wheel, installed non-editable into fresh virtual environments.

An editable install hides a module missing from the wheel; these tests build the wheel, check what it holds,
and install it the ways the README gives (`[onnxruntime]` without torch, `[all]`), each into a venv of its own.
They need the package registry (or pip's cache) and take minutes: marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from ddpm_plugin.demo.web.site import ORT_DIST, ORT_FILES

REPO = Path(__file__).resolve().parent.parent
# Folders of the repository -> where setup.py installs them.
MAPPED_FOLDERS = {"ddpm_plugin": "ddpm_plugin", "pipelines": "ddpm_plugin/pipelines", "export": "ddpm_plugin/export",
                  "demo": "ddpm_plugin/demo"}
TORCH_WHEEL = "torch==2.13.0"  # the CPU build (see scripts/setup.sh); any torch >= the declared bound works

pytestmark = pytest.mark.slow


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **kwargs.pop("env", {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)])
    log = build.stdout + build.stderr
    assert "SetuptoolsDeprecationWarning" not in log and "SetuptoolsWarning" not in log, log[-3000:]
    (path,) = out.glob("ddpm_plugin-*.whl")
    return path


def make_venv(path: Path, *requirements: str) -> Path:
    run([sys.executable, "-m", "venv", str(path)])
    python = path / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", *requirements])
    return python


def site_packages_mb(venv: Path) -> float:
    (site,) = venv.glob("lib/python*/site-packages")
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 2**20


def record_size(name: str, megabytes: float) -> None:
    """Installed sizes, collected for the README's install table."""
    sizes = REPO / "test-output" / "install-sizes.json"
    sizes.parent.mkdir(exist_ok=True)
    table = json.loads(sizes.read_text()) if sizes.is_file() else {}
    table[name] = round(megabytes)
    sizes.write_text(json.dumps(table, indent=1) + "\n")


def test_wheel_holds_every_module_and_the_bundled_models(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, installed in MAPPED_FOLDERS.items():
        for source in (REPO / folder).rglob("*.py"):
            if "node_modules" in source.parts:
                continue
            assert f"{installed}/{source.relative_to(REPO / folder).as_posix()}" in names, source
    assert "ddpm_plugin/export/engine_table.json" in names  # the engine choice's rules
    for source in (REPO / "ddpm_plugin" / "bundled").rglob("*"):
        if source.is_file() and source.suffix != ".py" and "__pycache__" not in source.parts:
            assert source.relative_to(REPO).as_posix() in names, source
    if ORT_DIST.is_dir():  # `npm ci` has installed onnxruntime-web: exactly the files the page loads go in
        packaged = sorted(name for name in names if name.startswith("ddpm_plugin/demo/web/ort/"))
        assert packaged == sorted(f"ddpm_plugin/demo/web/ort/{name}" for name in ORT_FILES), packaged
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"ddpm_plugin", wheel.name.split("-py3")[0] + ".dist-info"}, top_level
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    specifiers = [line.split(";")[0] for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert specifiers and not any("==" in spec or "<" in spec for spec in specifiers), specifiers  # no pins, no caps


def test_torch_free_install_samples_with_onnxruntime(wheel, tmp_path):
    venv = tmp_path / "venv"
    python = make_venv(venv, f"{wheel}[onnxruntime]")
    record_size("ddpm-plugin[onnxruntime]", site_packages_mb(venv))
    probe = run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"])
    assert probe.stdout.strip() == "True"
    script = (
        "from ddpm_plugin.bundled import BUNDLED_MODEL\n"
        "from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline\n"
        "import sys\n"
        "pipe = OnnxDDPMPipeline.from_pretrained(BUNDLED_MODEL / 'onnx')\n"
        "images = pipe(batch_size=2, num_inference_steps=2, scheduler='ddim', seed=0, progress_bar=False).images\n"
        "assert 'torch' not in sys.modules\n"
        "print(images.shape, images.dtype)\n"
    )
    assert "(2, " in run([str(python), "-c", script], cwd=tmp_path).stdout
    ddpm = venv / "bin" / "ddpm"
    assert run([str(ddpm), "--version"]).stdout.startswith("ddpm-plugin ")
    assert "would sample with: onnxruntime" in run([str(ddpm), "info", "--model", "digits", "--batch-size", "16"]).stdout
    refused = subprocess.run([str(ddpm), "train", "--preset", "digits", "--output-dir", str(tmp_path / "run")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert 'pip install "ddpm-plugin[train]"' in refused.stderr


def test_all_extras_install_runs_every_command(wheel, tmp_path, free_port):
    venv = tmp_path / "venv"
    python = make_venv(venv, TORCH_WHEEL)
    run([str(python), "-m", "pip", "install", "-q", f"{wheel}[all]"])
    record_size("torch + ddpm-plugin[all]", site_packages_mb(venv))
    ddpm = str(venv / "bin" / "ddpm")
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert run([ddpm, "--version"], env=env).stdout.strip().startswith("ddpm-plugin 0.")
    assert "| cifar10 | 32x32x3 | 35,746,307 |" in run([ddpm, "info"], env=env).stdout
    for backend in ("pytorch", "onnxruntime", "openvino"):
        grid = tmp_path / f"grid-{backend}.png"
        run([ddpm, "sample", "--num-images", "4", "--steps", "2", "--scheduler", "ddim", "--backend", backend,
             "--output", str(grid)], env=env, cwd=tmp_path)
        assert grid.stat().st_size > 0
    port = free_port()
    server = subprocess.Popen([ddpm, "demo", "--port", str(port)], cwd=tmp_path, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 120, ""
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert "gradio" in page.lower(), server.stdout.read() if server.poll() is not None else "no page"
        if ORT_DIST.is_dir():  # the browser page's runtime, served from the installed package
            runtime, status = f"http://127.0.0.1:{port}/web/ort/{ORT_FILES[0]}", None
            while status != 200 and time.monotonic() < deadline + 30:  # the page is mounted after Gradio starts
                try:
                    status = urllib.request.urlopen(runtime, timeout=10).status
                except OSError:
                    time.sleep(1)
            assert status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
