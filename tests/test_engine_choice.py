"""The engine choice: the backend, precision and threads `ddpm sample` picks by the machine's capabilities (faked
here), the work per step and the engine table; `--backend`/`--precision` still force; `ddpm info` says why."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ddpm_plugin.bundled import DIGITS_MODEL
from ddpm_plugin.cli import main
from ddpm_plugin.export.engine_choice import (
    TABLE_FILE,
    Capabilities,
    EngineTableError,
    choose_engine,
    load_table,
    parse_table,
)
from ddpm_plugin.sample_shards import MANIFEST

AMX = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
AVX2 = ("avx2", "fma")
EVERYTHING = frozenset({"onnxruntime", "openvino", "pytorch"})

TABLE = {
    "format_version": 1,
    "measured_on": {"cpu": "a test CPU", "instruction_sets": list(AMX), "threads": 4},
    "results": "docs/results/engine_choice.md",
    "measured_by": "benchmarks/engine_choice.py",
    "rules": [
        {"bf16": True, "max_gflop_per_step": 0.1,
         "choices": [{"backend": "onnxruntime", "precision": "fp32", "threads": 1},
                     {"backend": "pytorch", "precision": "fp32", "threads": None}]},
        {"bf16": True, "max_gflop_per_step": None,
         "choices": [{"backend": "openvino", "precision": "bf16", "threads": None},
                     {"backend": "pytorch", "precision": "bf16", "threads": None},
                     {"backend": "onnxruntime", "precision": "fp32", "threads": None}]},
        {"bf16": False, "max_gflop_per_step": None,
         "choices": [{"backend": "onnxruntime", "precision": "fp32", "threads": None},
                     {"backend": "pytorch", "precision": "fp32", "threads": None}]},
    ],
}


def machine(sets=AMX, cores=4, installed=EVERYTHING) -> Capabilities:
    return Capabilities(tuple(sets), cores, frozenset(installed))


@pytest.fixture
def table():
    return parse_table(copy.deepcopy(TABLE), "test table")


def model_folder(root: Path, gflop_per_image: float | None = 1.0, precision: str = "fp32", export: bool = True,
                 pipeline: bool = True) -> Path:
    """A folder with what the choice reads: `model_index.json` (a pipeline) and `onnx/ddpm_onnx.json` (an export)."""
    root.mkdir()
    if pipeline:
        (root / "model_index.json").write_text("{}")
    if export:
        (root / "onnx").mkdir()
        metadata = {"format_version": 1, "precision": precision, "sample_size": 8, "in_channels": 1}
        if gflop_per_image is not None:
            metadata["gflop_per_image"] = gflop_per_image
        (root / "onnx" / "ddpm_onnx.json").write_text(json.dumps(metadata))
    return root


def test_a_bf16_machine_with_large_work_samples_on_openvino_bf16_on_every_core(tmp_path, table):
    choice = choose_engine(model_folder(tmp_path / "m"), 16, capabilities=machine(), table=table)
    assert (choice.backend, choice.precision, choice.num_threads) == ("openvino", "bf16", 4)
    assert "amx_bf16" in choice.reason and "16 GFLOP" in choice.reason and "rule 2" in choice.reason
    assert "a test CPU" in choice.reason and "docs/results/engine_choice.md" in choice.reason


def test_without_openvino_installed_the_next_choice_wins_and_the_reason_says_so(tmp_path, table):
    choice = choose_engine(model_folder(tmp_path / "m"), 16, capabilities=machine(installed={"onnxruntime", "pytorch"}),
                           table=table)
    assert (choice.backend, choice.precision) == ("pytorch", "bf16")
    assert 'openvino bf16: not installed (pip install "ddpm-plugin[openvino]")' in choice.reason


def test_a_machine_without_bf16_takes_the_fp32_rule(tmp_path, table):
    choice = choose_engine(model_folder(tmp_path / "m"), 16, capabilities=machine(AVX2), table=table)
    assert (choice.backend, choice.precision, choice.num_threads) == ("onnxruntime", "fp32", 4)
    assert "no bf16 instructions" in choice.reason and "rule 3" in choice.reason


def test_tiny_work_runs_onnxruntime_on_one_thread(tmp_path, table):
    choice = choose_engine(model_folder(tmp_path / "m", gflop_per_image=0.03), 2, capabilities=machine(), table=table)
    assert (choice.backend, choice.precision, choice.num_threads) == ("onnxruntime", "fp32", 1)
    assert "0.06 GFLOP" in choice.reason and "rule 1" in choice.reason


def test_onnxruntime_reports_the_exports_own_precision_and_openvino_skips_a_non_float32_export(tmp_path, table):
    folder = model_folder(tmp_path / "m", precision="int8", pipeline=False)
    choice = choose_engine(folder, 16, capabilities=machine(), table=table)
    assert (choice.backend, choice.precision) == ("onnxruntime", "int8")
    assert "openvino bf16: runs a float32 export, this one is int8" in choice.reason


def test_a_folder_without_an_export_samples_on_pytorch(tmp_path, table):
    choice = choose_engine(model_folder(tmp_path / "m", export=False), 16, capabilities=machine(), table=table)
    assert (choice.backend, choice.precision) == ("pytorch", "fp32")
    assert "carries no ONNX export" in choice.reason and "ddpm export" in choice.reason


def test_an_export_without_its_flops_samples_as_before_and_says_to_re_export(tmp_path, table):
    choice = choose_engine(model_folder(tmp_path / "m", gflop_per_image=None), 16, capabilities=machine(), table=table)
    assert (choice.backend, choice.precision) == ("onnxruntime", "fp32")
    assert "re-export with `ddpm export` to record the network's FLOPs" in choice.reason


def test_a_forced_backend_or_precision_restricts_the_choices(tmp_path, table):
    folder, amx = model_folder(tmp_path / "m"), machine()
    assert choose_engine(folder, 16, backend="pytorch", capabilities=amx, table=table).precision == "bf16"
    forced = choose_engine(folder, 16, precision="fp32", capabilities=amx, table=table)
    assert (forced.backend, forced.precision) == ("onnxruntime", "fp32") and "--precision fp32" in forced.reason
    # The tiny-work rule has no OpenVINO choice: the forced backend runs at float32, and the reason says why.
    tiny = choose_engine(folder, 1, backend="openvino", capabilities=amx, table=table_with_a_larger_first_rule())
    assert (tiny.backend, tiny.precision) == ("openvino", "fp32") and "no runnable choice" in tiny.reason
    both = choose_engine(folder, 16, backend="openvino", precision="fp32", capabilities=amx, table=table)
    assert (both.backend, both.precision) == ("openvino", "fp32")
    # A machine without bf16 has no bf16 choice: a forced bf16 runs on OpenVINO, not on onnxruntime's float32.
    no_bf16 = choose_engine(folder, 16, precision="bf16", capabilities=machine(AVX2), table=table)
    assert (no_bf16.backend, no_bf16.precision) == ("openvino", "bf16")


def table_with_a_larger_first_rule():
    data = copy.deepcopy(TABLE)
    data["rules"][0]["max_gflop_per_step"] = 10.0
    return parse_table(data, "tiny table")


def test_a_forced_precision_the_backend_cannot_run_is_refused(tmp_path, table):
    with pytest.raises(ValueError, match="onnxruntime runs the export's own precision and has no bf16 path"):
        choose_engine(model_folder(tmp_path / "m"), 1, backend="onnxruntime", precision="bf16", capabilities=machine(),
                      table=table)
    with pytest.raises(ValueError, match=r"`precision` must be one of \['fp32', 'bf16'\], got 'int4'"):
        choose_engine(model_folder(tmp_path / "n"), 1, precision="int4", capabilities=machine(), table=table)


@pytest.mark.parametrize("path, value, message", [
    (("rules", 1, "choices", 0, "backend"), "tensorrt", "`rules[1].choices[0].backend` must be one of"),
    (("rules", 0, "max_gflop_per_step"), -1, "`rules[0].max_gflop_per_step` must be a number > 0 or null, got -1"),
    (("rules", 2, "bf16"), "no", "`rules[2].bf16` must be true or false"),
    (("rules", 0, "choices", 0, "threads"), 0, "`rules[0].choices[0].threads` must be a whole number >= 1 or null"),
    (("rules", 1, "choices", 2, "precision"), "bf16", "`rules[1].choices[2].precision` bf16: onnxruntime runs"),
    (("format_version",), 2, "`format_version` must be 1, got 2"),
    (("rules", 2, "max_gflop_per_step"), 5.0, "needs a rule with `bf16` false and `max_gflop_per_step` null"),
])
def test_a_broken_table_is_refused_naming_the_field(path, value, message):
    data = copy.deepcopy(TABLE)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(EngineTableError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_table(data, "broken table")


def test_a_table_without_a_field_is_refused_naming_it():
    data = copy.deepcopy(TABLE)
    del data["measured_on"]["threads"]
    with pytest.raises(EngineTableError, match="lacks `threads`"):
        parse_table(data, "broken table")


def test_the_shipped_table_parses_and_has_a_rule_for_every_machine():
    shipped = load_table()
    assert {rule.bf16 for rule in shipped.rules} == {True, False}
    assert json.loads(TABLE_FILE.read_text())["measured_by"].startswith("benchmarks/")


def test_ddpm_export_and_the_bundled_exports_record_the_flops_torch_counts(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DModel

    from ddpm_plugin.export.onnx_export import export_onnx, unet_gflop_per_image

    for folder, export in ((DIGITS_MODEL, DIGITS_MODEL / "onnx"),
                           (tiny_pipeline_dir, export_onnx(tiny_pipeline_dir, tmp_path / "onnx", seed=0).output_dir)):
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True).eval()
        recorded = json.loads((export / "ddpm_onnx.json").read_text())["gflop_per_image"]
        assert recorded == round(unet_gflop_per_image(unet), 6) > 0
    assert 0.01 < json.loads((DIGITS_MODEL / "onnx" / "ddpm_onnx.json").read_text())["gflop_per_image"] < 0.1


def test_ddpm_info_prints_the_choice_without_importing_an_engine():
    script = ("import sys\nfrom ddpm_plugin.cli import main\n"
              "assert main(['info', '--no-count', '--model', 'digits', '--batch-size', '16']) == 0\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'openvino')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "would sample with: " in result.stdout and "per image x batch 16" in result.stdout
    assert "instruction sets:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_ddpm_sample_forced_to_openvino_bf16_writes_a_grid(tmp_path):
    pytest.importorskip("openvino", reason="the OpenVINO backend needs `pip install ddpm-plugin[openvino]`")
    output = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_plugin.cli", "sample", "--model", "digits", "--backend", "openvino",
         "--precision", "bf16", "--num-images", "4", "--steps", "3", "--scale", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ddpm sample: openvino bf16" in result.stderr and "(openvino)" in result.stdout
    assert Image.open(output).size == (19, 19)


def test_a_sharded_run_records_the_resolved_choice_and_resumes_with_the_same_flags(tmp_path, capsys):
    flags = ["sample", "--model", "digits", "--output-dir", str(tmp_path / "run"), "--num-images", "3",
             "--batch-size", "2", "--steps", "3"]
    assert main(flags) == 0
    choice = choose_engine(DIGITS_MODEL, 2)
    run = json.loads((tmp_path / "run" / MANIFEST).read_text())["run"]
    assert run["backend"] == choice.backend and run["precision"].startswith(choice.precision)
    capsys.readouterr()
    assert main(flags) == 0
    assert "2 kept from an earlier run" in capsys.readouterr().out
    assert main([*flags, "--backend", choice.backend]) == 0  # the same engine forced: the same run
    assert "2 kept from an earlier run" in capsys.readouterr().out
