"""benchmarks/sampling.py: the spread flag, the interleaved order and the machine description, on synthetic
timings (the benchmark itself takes minutes; `python benchmarks/sampling.py --quick` is its smoke test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "sampling.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("sampling_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_timing_reports_min_median_max_and_spread(benchmark):
    timing = benchmark.Timing.of([1.30, 1.00, 1.10, 1.05, 1.02])
    assert (timing.minimum, timing.median, timing.maximum) == (1.00, 1.05, 1.30)
    assert timing.spread == pytest.approx(0.30 / 1.05)
    assert timing.scaled(1000 / 50).median == pytest.approx(21.0)


@pytest.mark.parametrize(("times", "noisy"), [
    ([1.00, 1.01, 1.02, 0.99, 1.00], False),  # 3% spread
    ([1.00, 1.00, 1.00, 1.00, 1.09], False),  # 9%: within the limit
    ([1.00, 1.00, 1.00, 1.00, 1.11], True),   # one slow run of five is enough
    ([0.80, 1.00, 1.00, 1.00, 1.00], True),   # and so is one fast run
    ([2.00, 1.00, 3.00, 1.50, 2.50], True),
])
def test_a_row_is_flagged_when_its_spread_exceeds_ten_percent(benchmark, times, noisy):
    assert benchmark.SPREAD_LIMIT == 0.10
    assert benchmark.Timing.of(times).noisy is noisy


def test_timing_of_nothing_is_an_error(benchmark):
    with pytest.raises(ValueError, match="at least one"):
        benchmark.Timing.of([])


def test_backends_are_interleaved_round_by_round(benchmark):
    order = benchmark.interleaved(["a", "b", "c"], 5)
    assert order[:6] == ["a", "b", "c", "a", "b", "c"] and len(order) == 15
    assert all(order.count(backend) == 5 for backend in "abc")
    assert benchmark.MIN_REPEATS >= 5


def test_both_diffusers_baselines_and_every_precision_are_benchmarked(benchmark):
    assert benchmark.BASELINES == ("diffusers-fp32", "diffusers-bf16")
    assert set(benchmark.BASELINES) <= set(benchmark.DEFAULT_BACKENDS) <= set(benchmark.BACKENDS)
    assert set(benchmark.PRECISION.values()) == {"fp32", "bf16", "int8"}
    assert {"onnx-dynamo", "onnx-torchscript", "onnx-int8", "paper-fp32", "paper-bf16", "openvino-fp32",
            "openvino-bf16", "default"} <= set(benchmark.DEFAULT_BACKENDS)
    # every ONNX backend runs an export the benchmark makes; `default` finds the dynamo graph as `ddpm sample` does
    assert benchmark.EXPORT_OF["default"] == benchmark.EXPORT_OF["openvino-bf16"] == "onnx-dynamo"
    assert all(benchmark.EXPORT_OF[name] in benchmark.ONNX_FOLDERS for name in benchmark.BACKENDS
               if name.startswith(("onnx", "openvino")))


def test_cases_and_backends_are_parsed_or_refused_by_name(benchmark):
    Case = benchmark.Case
    assert benchmark.parse_cases("digits:1:1000,cifar10:8:100") == [Case("digits", 1, 1000), Case("cifar10", 8, 100)]
    assert benchmark.parse_cases("/models/a:b:2:5") == [Case("/models/a:b", 2, 5)]
    for text in ("digits:0:10", "digits:1", "digits:x:10"):
        with pytest.raises(ValueError, match="model:batch:steps"):
            benchmark.parse_cases(text)
    assert benchmark.parse_backends("default,openvino-bf16") == ("default", "openvino-bf16")
    with pytest.raises(ValueError, match="--backends"):
        benchmark.parse_backends("default,tensorrt")


def test_the_default_row_is_set_against_the_rate_of_the_precision_it_ran(benchmark):
    assert benchmark.rate_precision("default", {"precision": "bf16, float32 below t=10"}) == "bf16"
    assert benchmark.rate_precision("default", {"precision": "fp32"}) == "fp32"
    assert benchmark.rate_precision("openvino-bf16", {"precision": "anything"}) == "bf16"


def measured_case(benchmark, case, seconds: dict, precision: str = "bf16, float32 below t=10"):
    results = {name: {"wall": benchmark.Timing.of([value] * 5), "engine": "pytorch", "precision": precision}
               for name, value in seconds.items()}
    return case, results


def test_goals_report_the_speed_ups_and_the_share_of_the_bf16_rate(benchmark):
    Timing = benchmark.Timing
    roofline = {"fp32": Timing.of([300.0, 310.0]), "bf16": Timing.of([2200.0, 2240.0]), "int8": Timing.of([900.0])}
    # cifar10 at batch 8, 100 steps: 12.1 GFLOP per image; default 9 s, diffusers bf16 16.8 s
    cifar = measured_case(benchmark, benchmark.Case("cifar10", 8, 100), {"default": 9.0, "diffusers-bf16": 16.8})
    digits = measured_case(benchmark, benchmark.Case("digits", 1, 1000), {"default": 1.0, "diffusers-fp32": 4.0}, "fp32")
    lines = benchmark.goal_lines([(*cifar, 12.1), (*digits, 0.01)], roofline)
    assert len(lines) == 2
    rate = 12.1 * 8 * 100 / 9.0
    assert "1.87x diffusers-bf16 (goal >= 1.6x: met)" in lines[0]
    assert f"{rate / 2220:.0%} of the bf16 matmul rate (goal >= 50%: NOT met)" in lines[0]
    assert "4.00x diffusers-fp32 (goal >= 5.0x: NOT met)" in lines[1] and "matmul" not in lines[1]
    # a case without the goal's baseline has no goal line
    assert benchmark.goal_lines([(*measured_case(benchmark, benchmark.Case("cifar10", 8, 5), {"default": 1.0}), 12.1)],
                                roofline) == []
