"""benchmarks/engine_choice.py: the rules it derives from timings, the quality admission of bf16 candidates, and
the table it writes (read back by `export.engine_choice.parse_table`), on made-up timings."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from ddpm_plugin.export.engine_choice import Capabilities, choose_engine, parse_table

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "engine_choice.py"


@pytest.fixture(scope="module")
def engine_choice():
    spec = importlib.util.spec_from_file_location("engine_choice_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# work (GFLOP per step) -> seconds per step of candidates a, b, c
CASES = [
    (0.01, {"a": 1.0, "b": 2.0, "c": 4.0}),
    (0.1, {"a": 2.0, "b": 3.0, "c": 8.0}),
    (1.0, {"a": 10.0, "b": 6.0, "c": 8.0}),
    (10.0, {"a": 100.0, "b": 60.0, "c": 30.0}),
]


def test_a_rule_ends_at_the_geometric_midpoint_where_the_winner_changes(engine_choice):
    rules = engine_choice.derive_rules(list(reversed(CASES)), ["a", "b", "c"])  # order of the cases does not matter
    assert [limit for limit, _ in rules[:2]] == pytest.approx([math.sqrt(0.1 * 1.0), math.sqrt(1.0 * 10.0)])
    assert rules[2][0] is None
    assert [ranked[0] for _, ranked in rules] == ["a", "b", "c"]


def test_a_rule_also_ends_where_only_the_runner_up_changes(engine_choice):
    # a machine without `a` installed gets b at small work and c at large work
    cases = [(0.01, {"a": 1.0, "b": 2.0, "c": 4.0}), (0.1, {"a": 1.0, "b": 2.0, "c": 4.0}), (1.0, {"a": 1.0, "b": 4.0, "c": 2.0})]
    assert engine_choice.derive_rules(cases, ["a", "b", "c"]) == [
        (pytest.approx(math.sqrt(0.1)), ["a", "b", "c"]), (None, ["a", "c", "b"])]
    (_, only), = engine_choice.derive_rules([(1.0, {"a": 3.0, "b": 1.0, "c": 2.0})], ["a", "b", "c"])
    assert only == ["b", "c", "a"]


def test_a_candidate_missing_from_a_case_is_left_out_of_its_rule(engine_choice):
    cases = [(0.01, {"a": 1.0, "b": 2.0, "c": math.inf}), (0.1, {"a": 1.0, "b": 2.0})]
    (limit, ranked), = engine_choice.derive_rules(cases, ["a", "b", "c"])
    assert limit is None and ranked == ["a", "b"]


def test_no_cases_is_an_error(engine_choice):
    with pytest.raises(ValueError, match="at least one case"):
        engine_choice.derive_rules([], ["a"])


@pytest.mark.parametrize(("row", "ok"), [
    ({"bits_per_dim_change": 0.0013, "ddim": {"frechet_change": -0.006}}, True),
    ({"bits_per_dim_change": 0.024, "ddim": {"frechet_change": 0.027}}, False),  # bf16 at every t: over the bound
    ({"bits_per_dim_change": 0.003, "ddim": {"frechet_change": 0.075}}, False),  # int8 below t: over Frechet
    ({"bits_per_dim_change": 0.001}, False),
    (None, False),
])
def test_a_bf16_candidate_needs_both_budgets(engine_choice, row, ok):
    assert engine_choice.within_budget(row)[0] is ok


TIMINGS = [  # the candidates' names; made-up seconds per step
    (0.005, {"onnx-threads1": 0.5, "onnx-dynamo": 0.7, "openvino-fp32": 0.9, "openvino-bf16": 1.0,
             "pytorch-bf16": 3.0, "pytorch-fp32": 2.5}),
    (0.5, {"onnx-threads1": 9.0, "onnx-dynamo": 5.0, "openvino-fp32": 5.5, "openvino-bf16": 4.0,
           "pytorch-bf16": 7.0, "pytorch-fp32": 8.0}),
    (100.0, {"onnx-threads1": 900.0, "onnx-dynamo": 400.0, "openvino-fp32": 380.0, "openvino-bf16": 95.0,
             "pytorch-bf16": 120.0, "pytorch-fp32": 350.0}),
]
MACHINE = {"cpu": "a test CPU", "instruction_sets": ["avx512f", "amx_bf16"], "threads": 2}


def test_the_table_is_one_choose_engine_reads(engine_choice, tmp_path):
    admitted = list(engine_choice.CANDIDATES)
    data = engine_choice.engine_table(TIMINGS, admitted, MACHINE, "made-up timings")
    bf16 = [rule for rule in data["rules"] if rule["bf16"]]
    fp32 = [rule for rule in data["rules"] if not rule["bf16"]]
    assert [rule["choices"][0]["backend"] + " " + rule["choices"][0]["precision"] for rule in bf16] == [
        "onnxruntime fp32", "openvino bf16", "openvino bf16"]  # the last two differ in their runner-up
    assert [rule["choices"][1]["backend"] + " " + rule["choices"][1]["precision"] for rule in bf16[1:]] == [
        "onnxruntime fp32", "pytorch bf16"]
    assert bf16[0]["choices"][0]["threads"] == 1 and bf16[0]["max_gflop_per_step"] == pytest.approx(math.sqrt(0.005 * 0.5), abs=1e-4)
    assert all(choice["precision"] == "fp32" for rule in fp32 for choice in rule["choices"])
    # without bf16: one thread for the smallest work, every core for more, PyTorch fp32 for the most
    assert [(rule["choices"][0]["backend"], rule["choices"][0]["threads"]) for rule in fp32] == [
        ("onnxruntime", 1), ("onnxruntime", None), ("pytorch", None)]
    table = parse_table(data, "made-up table")
    assert table.results == engine_choice.RESULTS
    # what the shipped reader then picks on a bf16 machine for the bundled digits model at batch 1
    model = Path(__file__).resolve().parent.parent / "ddpm_plugin" / "bundled" / "ddpm-digits"
    capabilities = Capabilities(("avx512f", "amx_bf16"), 2, frozenset({"onnxruntime", "openvino", "pytorch"}))
    choice = choose_engine(model, 1, capabilities=capabilities, table=table)
    assert (choice.backend, choice.num_threads) == ("onnxruntime", 1)  # the digits model's few MFLOP per image


def test_bf16_candidates_out_of_budget_stay_out_of_the_table(engine_choice):
    admitted = [name for name in engine_choice.CANDIDATES if name != "openvino-bf16"]
    data = engine_choice.engine_table(TIMINGS, admitted, MACHINE, "made-up timings")
    assert not any(choice["backend"] == "openvino" and choice["precision"] == "bf16"
                   for rule in data["rules"] for choice in rule["choices"])
    last_bf16_rule = [rule for rule in data["rules"] if rule["bf16"]][-1]
    assert last_bf16_rule["max_gflop_per_step"] is None
    assert last_bf16_rule["choices"][0] == {"backend": "pytorch", "precision": "bf16", "threads": None}
