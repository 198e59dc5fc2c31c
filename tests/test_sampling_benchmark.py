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
    assert set(benchmark.BASELINES) <= set(benchmark.BACKENDS)
    assert set(benchmark.PRECISION.values()) == {"fp32", "bf16", "int8"}
    assert {"onnx-dynamo", "onnx-torchscript", "onnx-int8", "paper-fp32", "paper-bf16"} <= set(benchmark.BACKENDS)


def test_instruction_sets_are_read_from_the_cpu(benchmark):
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = benchmark.instruction_sets()
    assert all(name in benchmark.INSTRUCTION_SETS and name in flags for name in found)
    if " avx2 " in flags.replace("\n", " "):
        assert "avx2" in found
