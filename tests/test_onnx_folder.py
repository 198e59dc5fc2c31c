"""Opening an export folder (`export/onnx_folder.py`): every file a regular file inside the folder, external data
found by parsing the model, every metadata field checked, declared sizes checked against memory before anything
is built, and no onnxruntime needed to resolve an export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_plugin.bundled import DIGITS_MODEL
from ddpm_plugin.export.onnx_folder import OnnxModelError, external_data_locations, open_export_folder
from ddpm_plugin.export.onnx_pipeline import OnnxDDPMPipeline

REPO = Path(__file__).resolve().parent.parent
CAPPED_MEMORY = str(8 << 30)  # the address space the size checks run under, whatever this machine has


@pytest.fixture
def shipped_export(tmp_path) -> Path:
    return Path(shutil.copytree(DIGITS_MODEL / "onnx", tmp_path / "onnx"))


def external(folder: Path) -> Path:
    """`folder/model.onnx` rewritten to keep its weights in `folder/model.onnx.data`."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    return folder / "model.onnx.data"


def test_a_location_written_value_first_is_found_and_refused(shipped_export, tmp_path):
    """Protobuf fields may come in any order: `value` before `key` is the same entry to onnx and onnxruntime."""
    import onnx

    secret = tmp_path / "secret1.data"  # "../secret1.data" is as long as "model.onnx.data": lengths stay valid
    shutil.move(external(shipped_export), secret)
    model = shipped_export / "model.onnx"
    hostile = os.path.relpath(secret, shipped_export).encode()
    key_first = b"\x0a\x08location\x12" + bytes([len(b"model.onnx.data")]) + b"model.onnx.data"
    value_first = b"\x12" + bytes([len(hostile)]) + hostile + b"\x0a\x08location"
    model.write_bytes(model.read_bytes().replace(key_first, value_first))
    # onnx's own reader sees the hostile location ...
    loaded = onnx.load(str(model), load_external_data=False)
    assert {entry.value for tensor in loaded.graph.initializer for entry in tensor.external_data
            if entry.key == "location"} == {hostile.decode()}
    # ... and so does the folder check, which refuses it before onnxruntime reads a byte of it.
    assert set(external_data_locations(model)) == {hostile.decode()}
    with pytest.raises(OnnxModelError, match="outside the export folder"):
        OnnxDDPMPipeline.from_pretrained(shipped_export, provider="cpu")


def test_external_data_locations_match_onnxs_reader(shipped_export):
    import onnx

    external(shipped_export)
    model = onnx.load(str(shipped_export / "model.onnx"), load_external_data=False)
    expected = [entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                if entry.key == "location"]
    assert expected and sorted(external_data_locations(shipped_export / "model.onnx")) == sorted(expected)


def test_a_weights_file_linked_from_inside_the_folder_is_refused(shipped_export, tmp_path):
    secret = tmp_path / "secret.data"
    shutil.move(external(shipped_export), secret)
    (shipped_export / "model.onnx.data").symlink_to(secret)
    with pytest.raises(OnnxModelError, match="is a link") as error:
        OnnxDDPMPipeline.from_pretrained(shipped_export, provider="cpu")
    assert "'model.onnx.data'" in str(error.value)


def test_a_linked_model_or_metadata_file_is_refused(shipped_export, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(shipped_export / "model.onnx", outside)
    (shipped_export / "model.onnx").symlink_to(outside)
    with pytest.raises(OnnxModelError, match="is a link"):
        open_export_folder(shipped_export)


@pytest.mark.parametrize("change, message", [
    (lambda m: [1, 2], "must hold a JSON object, got list"),
    (lambda m: {k: v for k, v in m.items() if k != "sample_size"}, "lacks `sample_size`"),
    (lambda m: {**m, "in_channels": 1.0}, "`in_channels` must be a whole number >= 1, got 1.0"),
    (lambda m: {**m, "sample_size": "8"}, "`sample_size` must be a whole number >= 1, got '8'"),
    (lambda m: {**m, "sample_size": [8, 8]}, "`sample_size` must be a whole number >= 1, got [8, 8]"),
    (lambda m: {**m, "float32_below_t": "5"}, "`float32_below_t` must be an integer >= 0, got '5'"),
])
def test_each_metadata_defect_gets_one_message(shipped_export, change, message):
    path = shipped_export / "ddpm_onnx.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(OnnxModelError, match="ddpm_onnx.json") as error:
        open_export_folder(shipped_export)
    assert message in str(error.value)


def run_capped(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(["prlimit", f"--as={CAPPED_MEMORY}", sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("file, field, value", [
    ("ddpm_onnx.json", "sample_size", 30000),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 300_000_000),
])
def test_sizes_declared_in_an_export_are_checked_before_anything_is_allocated(shipped_export, file, field, value):
    """A 30000x30000 input or 3e8 timesteps fit in a few bytes of JSON; they are refused under a capped address
    space before any buffer or schedule is built."""
    path = shipped_export / file
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    result = run_capped(
        "from ddpm_plugin.cli import main; import sys; "
        f"sys.exit(main(['sample', '--model', {str(shipped_export)!r}, '--steps', '2', '--output', "
        f"{str(shipped_export / 'grid.png')!r}]))"
    )
    assert result.returncode == 2, result.stderr
    assert f"`{field}` {value}" in result.stderr and "more than this machine can hold" in result.stderr
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr


def test_resolving_an_export_needs_no_onnxruntime(shipped_export):
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from ddpm_plugin.export.coefficients import write_coefficients\n"
        "from ddpm_plugin.export.onnx_folder import open_export_folder\n"
        f"print(open_export_folder({str(shipped_export)!r}).image_shape, write_coefficients({str(shipped_export)!r}).name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(1,", "8,", "8)", "diffusion_coefficients.json"]


def test_an_export_with_non_finite_weights_is_refused_naming_them(shipped_export):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(shipped_export / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(tensor).copy()
    values.flat[:3] = [np.inf, np.nan, -np.inf]
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(shipped_export / "model.onnx"))
    with pytest.raises(OnnxModelError, match="3 non-finite weights") as error:
        open_export_folder(shipped_export)
    assert f"{tensor.name} (3)" in str(error.value)
