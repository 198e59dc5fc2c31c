"""Which engine samples fastest on this CPU, by work per step: times the candidate engines over cases that span
the work per step and writes the engine table `ddpm sample` chooses from (`export/engine_table.json`) and
`docs/results/engine_choice.md`.

Candidates (the workers of `benchmarks/sampling.py`, one process each, loaded one at a time, then timed in
interleaved rounds): onnxruntime fp32 on every physical core and on one thread, OpenVINO fp32 and bf16, PyTorch bf16
(bf16 weights in channels-last) and fp32, each as `open_sampler` opens it. The bf16 candidates are timed at bf16 on
every step (`--bf16-float32-below-t 0`): a short run's t = 0 step would otherwise weigh 1 / steps instead of the
1% of float32 steps a 1000-step run has. A bf16 candidate enters the table only when its quality row (bits/dim and
DDIM-50 Frechet distance with float32 below t = `BF16_FLOAT32_BELOW_T`, `benchmarks/precision_quality.py`) is within
the budgets of docs/quality.md.

The work of a case is the UNet's GFLOP per image (as `ddpm export` records it) times the batch size. For each
capability (`"bf16": true`: every admitted candidate; `"bf16": false`: the float32 candidates only, timed on this same
machine) the cases are ordered by work; where the order of the candidates changes between neighbouring cases (the
fastest, or the one a machine without the faster engines installed would get), a rule ends at the geometric midpoint
of their work. Each rule lists its candidates from fastest to slowest, so a machine without the winner's engine gets
the next one.

    python benchmarks/engine_choice.py                      # about 15-25 minutes on 2 idle cores
    python benchmarks/engine_choice.py --cases digits:1:50 --no-write   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ddpm_plugin.export.cpu import cpu_name, instruction_sets, physical_cpu_count
from ddpm_plugin.vocabulary import BF16_FLOAT32_BELOW_T


def _load_sampling_benchmark() -> Any:
    """benchmarks/sampling.py as a module: its cases, workers, roofline and model exports."""
    if "sampling_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sampling_benchmark", Path(__file__).with_name("sampling.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["sampling_benchmark"]


bench = _load_sampling_benchmark()
ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "export" / "engine_table.json"
RESULTS = "docs/results/engine_choice.md"
RAW_RESULTS = "docs/results/engine_choice.json"  # every timing, from which the rules can be derived again
# sampling.py's worker name -> the engine table's choice.
CANDIDATES: dict[str, dict[str, Any]] = {
    "onnx-dynamo": {"backend": "onnxruntime", "precision": "fp32", "threads": None},
    "onnx-threads1": {"backend": "onnxruntime", "precision": "fp32", "threads": 1},
    "openvino-fp32": {"backend": "openvino", "precision": "fp32", "threads": None},
    "openvino-bf16": {"backend": "openvino", "precision": "bf16", "threads": None},
    "pytorch-bf16": {"backend": "pytorch", "precision": "bf16", "threads": None},
    "pytorch-fp32": {"backend": "pytorch", "precision": "fp32", "threads": None},
}
CASES = ("digits:1:200", "digits:16:100", "mnist:1:50", "mnist:16:10", "cifar10:1:5", "cifar10:8:3")
# The quality row that admits each bf16 candidate (file relative to the repository, row name).
QUALITY_ROWS = {
    "openvino-bf16": ("docs/results/precision_quality_mnist_openvino.json", f"openvino-bf16+fp32-below-t{BF16_FLOAT32_BELOW_T}"),
    "pytorch-bf16": ("docs/results/precision_quality_mnist.json", f"pytorch-bf16-dtype+fp32-below-t{BF16_FLOAT32_BELOW_T}"),
}
BITS_PER_DIM_BUDGET = 0.005  # relative rise over float32 (docs/quality.md)
FRECHET_BUDGET = 0.05  # relative rise of the DDIM-50 Frechet distance over float32's from the same x_T


# --- Admission and rules (unit-tested in tests/test_engine_choice_benchmark.py). ---


def within_budget(row: dict | None) -> tuple[bool, str]:
    """Whether a `precision_quality.py` report row keeps bits/dim and DDIM's Frechet distance within budget, and why."""
    if row is None:
        return False, "no quality row measured"
    bpd, frechet = row.get("bits_per_dim_change"), row.get("ddim", {}).get("frechet_change")
    if bpd is None or frechet is None:
        return False, "its quality row lacks bits/dim or the DDIM Frechet change"
    words = (f"bits/dim {bpd:+.2%} (budget {BITS_PER_DIM_BUDGET:.1%}), DDIM Frechet {frechet:+.1%} "
             f"(budget {FRECHET_BUDGET:.0%})")
    return bpd <= BITS_PER_DIM_BUDGET and frechet <= FRECHET_BUDGET, words


def derive_rules(cases: Sequence[tuple[float, dict[str, float]]], candidates: Sequence[str]) -> list[tuple[float | None, list[str]]]:
    """(max GFLOP per step or None, candidates fastest first) for each run of neighbouring cases (by work) that
    rank the candidates alike. `cases` are (work, {candidate: seconds per step}); a candidate missing from a case,
    or infinitely slow there, never runs it, and is left out of that case's ranking."""
    if not cases or not candidates:
        raise ValueError("the rules need at least one case and one candidate.")
    ordered = sorted(cases, key=lambda case: case[0])
    rankings = [sorted((name for name in candidates if math.isfinite(times.get(name, math.inf))), key=times.__getitem__)
                for _, times in ordered]
    rules: list[tuple[float | None, list[str]]] = []
    for index, ranking in enumerate(rankings):
        if rules and rules[-1][1] == ranking:
            continue
        if rules:  # the previous rule ends halfway (geometrically) between the previous case's work and this one's
            rules[-1] = (math.sqrt(ordered[index - 1][0] * ordered[index][0]), rules[-1][1])
        rules.append((None, ranking))
    return rules


def engine_table(cases: Sequence[tuple[float, dict[str, float]]], admitted: Sequence[str], machine: dict,
                 measured_by: str) -> dict:
    """The engine table (`export/engine_table.json`): bf16 rules from the `admitted` candidates, then fp32 rules
    from their float32 ones, both from the same timings."""
    rules = []
    for bf16 in (True, False):
        names = [name for name in admitted if bf16 or CANDIDATES[name]["precision"] == "fp32"]
        for limit, ranked in derive_rules(cases, names):
            rules.append({"bf16": bf16, "max_gflop_per_step": None if limit is None else round(limit, 4),
                          "choices": [CANDIDATES[name] for name in ranked]})
    return {"format_version": 1, "measured_on": machine, "results": RESULTS, "measured_by": measured_by, "rules": rules}


# --- Measuring. ---


def admitted_candidates(candidates: Sequence[str]) -> tuple[list[str], list[str]]:
    """The candidates the table may hold (float32 ones always; bf16 ones within the quality budget), and a line
    on each bf16 candidate."""
    admitted, lines = [], []
    for name in candidates:
        if CANDIDATES[name]["precision"] == "fp32":
            admitted.append(name)
            continue
        file, row_name = QUALITY_ROWS[name]
        path = ROOT / file
        row = json.loads(path.read_text())["rows"].get(row_name) if path.is_file() else None
        ok, words = within_budget(row)
        lines.append(f"{name}: {'admitted' if ok else 'left out'}: {row_name} in {file}: {words}")
        if ok:
            admitted.append(name)
    return admitted, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="model:batch:steps, comma-separated")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="candidates, comma-separated")
    parser.add_argument("--repeats", type=int, default=bench.MIN_REPEATS, help="timed runs per candidate and case")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    parser.add_argument("--no-write", action="store_true", help="print only; write neither the table nor the results")
    args = parser.parse_args()
    try:
        cases = bench.parse_cases(args.cases)
    except ValueError as error:
        parser.error(str(error))
    candidates = [name for name in args.candidates.split(",") if name]
    if not candidates or set(candidates) - set(CANDIDATES):
        parser.error(f"--candidates must name some of {list(CANDIDATES)}, got {args.candidates!r}")
    if args.repeats < bench.MIN_REPEATS:
        parser.error(f"--repeats must be at least {bench.MIN_REPEATS}, got {args.repeats}")

    threads = args.threads or physical_cpu_count()
    load_before = os.getloadavg()[0]
    admitted, quality_lines = admitted_candidates(candidates)
    before = bench.spawn_roofline(threads)
    measured = []
    with tempfile.TemporaryDirectory() as scratch:
        models = {name: bench.prepare_model(name, Path(scratch), None, exports=("onnx-dynamo",))
                  for name in dict.fromkeys(case.model for case in cases)}
        for case in cases:
            path, gflop = models[case.model]
            results = bench.measure_case(case, path, threads, args.repeats, "dtype-channels-last", candidates,
                                         bf16_float32_below_t=0)
            measured.append((case, gflop, results))
            print(f"# {case}: " + ", ".join(f"{name} {result['wall'].median * 1000 / case.num_inference_steps:.2f}"
                                            for name, result in results.items()) + " ms/step", flush=True)
    roofline = bench.roofline_of(before, bench.spawn_roofline(threads))
    timings = [(gflop * case.batch_size, {name: result["wall"].median / case.num_inference_steps
                                          for name, result in results.items()})
               for case, gflop, results in measured]
    machine = {"cpu": cpu_name(), "instruction_sets": list(instruction_sets()), "threads": threads}
    measured_by = ("benchmarks/engine_choice.py; the bf16: false rules rank the float32 candidates as timed on this "
                   "same bf16 machine, not on a CPU without bf16")
    table = engine_table(timings, admitted, machine, measured_by)
    report = results_report(measured, roofline, table, quality_lines, threads, load_before, args.repeats)
    print("\n".join(report))
    if not args.no_write:
        TABLE.write_text(json.dumps(table, indent=2) + "\n")
        (ROOT / RESULTS).write_text("\n".join(report) + "\n")
        raw = [{"model": Path(case.model).name, "batch_size": case.batch_size, "steps": case.num_inference_steps,
                "gflop_per_step": gflop * case.batch_size,
                "ms_per_step": {name: {key: value * 1000 / case.num_inference_steps for key, value in
                                       (("min", r["wall"].minimum), ("median", r["wall"].median), ("max", r["wall"].maximum))}
                                for name, r in results.items()}}
               for case, gflop, results in measured]
        (ROOT / RAW_RESULTS).write_text(json.dumps({"machine": machine, "load_average_start": load_before,
                                                    "cases": raw}, indent=1) + "\n")
        print(f"# wrote {TABLE}, {ROOT / RESULTS} and {ROOT / RAW_RESULTS}")


def results_report(measured: list, roofline: dict, table: dict, quality_lines: list[str], threads: int,
                   load_before: float, repeats: int) -> list[str]:
    candidates = list(measured[0][2])
    lines = [
        "# Engine choice: the candidates timed per case, and the rules `ddpm sample` follows",
        "",
        "Written by `python benchmarks/engine_choice.py`, with `export/engine_table.json`. "
        f"CPU: {cpu_name()}, {physical_cpu_count()} physical cores, {threads} threads; instruction sets: "
        f"{' '.join(instruction_sets()) or 'unknown'}; load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end. Matmul rates (2048^3, before and after): "
        + "; ".join(f"{name} {timing.minimum:.0f}-{timing.maximum:.0f}" for name, timing in roofline.items()
                    if name != "int8") + " GFLOP/s.",
        "",
        f"Median ms per step of {repeats} interleaved runs (NOISY: spread above {bench.SPREAD_LIMIT:.0%}); bf16 "
        "candidates at bf16 on every step. Work = GFLOP per image x batch.",
        "",
        "| case | GFLOP/step | " + " | ".join(candidates) + " | fastest |",
        "|---|---:|" + "---:|" * len(candidates) + "---|",
    ]
    for case, gflop, results in sorted(measured, key=lambda item: item[1] * item[0].batch_size):
        cells = [f"{results[name]['wall'].median * 1000 / case.num_inference_steps:.2f}"
                 + (" NOISY" if results[name]["wall"].noisy else "") for name in candidates]
        fastest = min(candidates, key=lambda name: results[name]["wall"].median)
        lines.append(f"| {Path(case.model).name} b{case.batch_size} ({case.num_inference_steps} steps) | "
                     f"{gflop * case.batch_size:.3g} | " + " | ".join(cells) + f" | {fastest} |")
    lines += ["", "Quality admission of the bf16 candidates (float32 below t = "
              f"{BF16_FLOAT32_BELOW_T}; budgets of docs/quality.md):", *(f"- {line}" for line in quality_lines), ""]
    lines += ["Rules (first match wins: the machine's bf16, then work <= max GFLOP per step; the `bf16: false` rules "
              "rank the float32 candidates as timed on this same machine, not on a CPU without bf16):", "",
              "| bf16 | max GFLOP/step | choices, fastest first |", "|---|---:|---|"]
    for rule in table["rules"]:
        limit = "any" if rule["max_gflop_per_step"] is None else f"{rule['max_gflop_per_step']:g}"
        choices = ", ".join(f"{c['backend']} {c['precision']}" + (f" ({c['threads']} thread)" if c["threads"] else "")
                            for c in rule["choices"])
        lines.append(f"| {str(rule['bf16']).lower()} | {limit} | {choices} |")
    return lines


if __name__ == "__main__":
    main()
