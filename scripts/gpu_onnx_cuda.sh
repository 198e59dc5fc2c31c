#!/usr/bin/env bash
# onnxruntime-gpu on a GPU machine that can fetch nothing: its wheel travels in parts, one part per transfer, then
# one run reassembles it, checks its SHA-256 against scripts/gpu_wheels.sha256, installs it with
# `pip install --no-index --no-deps --target` and runs the ONNX Runtime and PyTorch CUDA benchmarks in one go.
#
#   here:    scripts/gpu_onnx_cuda.sh split WHEEL [DIR]   checks WHEEL against the manifest, writes 40 MiB parts to DIR
#                                                         (default .gpu-parts; ignore it in .git/info/exclude)
#   device:  scripts/gpu_onnx_cuda.sh receive FILE...     only copies FILE(s) into $DDPM_WHEEL_PARTS, outside the repository
#   device:  scripts/gpu_onnx_cuda.sh install             reassembles, verifies and installs into $DDPM_WHEEL_TARGET
#   device:  scripts/gpu_onnx_cuda.sh run                 install, then both benchmarks with it first on PYTHONPATH;
#                                                         writes $DDPM_RESULTS (only when the benchmarks ran)
#
# Environment: DDPM_WHEEL_PARTS (default /tmp/ddpm-wheel-parts), DDPM_WHEEL_TARGET (/tmp/ddpm-gpu-site),
# DDPM_WHEEL_MANIFEST (scripts/gpu_wheels.sha256), DDPM_PART_SIZE (40M), DDPM_RESULTS (docs/results/onnx_cuda.md),
# PYTHON (python3), OUT (a folder that also receives the results and the log).
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
PARTS=${DDPM_WHEEL_PARTS:-/tmp/ddpm-wheel-parts}
TARGET=${DDPM_WHEEL_TARGET:-/tmp/ddpm-gpu-site}
MANIFEST=${DDPM_WHEEL_MANIFEST:-scripts/gpu_wheels.sha256}
PYTHON=${PYTHON:-python3}
RESULTS=${DDPM_RESULTS:-docs/results/onnx_cuda.md}

fail() { echo "gpu_onnx_cuda: $*" >&2; exit 1; }
from_caller() { if [[ $1 == /* ]]; then echo "$1"; else echo "$CALLER/$1"; fi; }  # paths as the caller named them

expected_sha256() {  # the manifest's SHA-256 of wheel file name $1, or nothing
    awk -v name="$1" '$2 == name || $2 == "*" name { print $1 }' "$MANIFEST"
}

split_wheel() {
    local wheel dir name expected actual
    [[ -n ${1:-} ]] || fail "split: name the wheel to split"
    wheel=$(from_caller "$1") dir=$(from_caller "${2:-.gpu-parts}")
    [[ -f $wheel ]] || fail "split: no file $wheel"
    name=$(basename "$wheel")
    expected=$(expected_sha256 "$name")
    [[ -n $expected ]] || fail "split: $name is not in $MANIFEST"
    actual=$(sha256sum "$wheel" | cut -d' ' -f1)
    [[ $actual == "$expected" ]] || fail "split: SHA-256 of $wheel is $actual, $MANIFEST says $expected"
    mkdir -p "$dir"
    rm -f "$dir/$name".part-*
    split -b "${DDPM_PART_SIZE:-40M}" "$wheel" "$dir/$name.part-"
    ls "$dir/$name".part-*
}

receive() {
    [[ $# -gt 0 ]] || fail "receive: name the part(s) to keep"
    mkdir -p "$PARTS"
    for file in "$@"; do
        file=$(from_caller "$file")
        [[ -f $file ]] || fail "receive: no file $file"
        cp -- "$file" "$PARTS/"
    done
    ls -l "$PARTS"
}

assemble_and_verify() {  # prints the verified wheels, one per line; fails naming what is missing or damaged
    local name expected actual count wheel
    mkdir -p "$PARTS/assembled"
    while read -r expected name; do
        name=${name#\*}
        [[ -n $name ]] || continue
        if [[ -f $PARTS/$name ]]; then
            wheel=$PARTS/$name count=1
        else
            count=$(find "$PARTS" -maxdepth 1 -name "$name.part-*" | wc -l)
            [[ $count -gt 0 ]] || fail "run: $name has not arrived: no $name or $name.part-* in $PARTS"
            wheel=$PARTS/assembled/$name
            cat "$PARTS/$name".part-* > "$wheel.tmp"  # the glob sorts aa, ab, ... in split's order
            mv "$wheel.tmp" "$wheel"
        fi
        actual=$(sha256sum "$wheel" | cut -d' ' -f1)
        [[ $actual == "$expected" ]] || fail "run: SHA-256 of $name (from $count file(s) in $PARTS, $(stat -c %s "$wheel") bytes) is $actual, $MANIFEST says $expected: a part is missing or damaged"
        echo "$wheel"
    done < "$MANIFEST"
}

install_wheels() {
    local verified wheels
    verified=$(assemble_and_verify) || exit 1
    mapfile -t wheels <<< "$verified"
    echo "verified: ${wheels[*]##*/}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$TARGET" "${wheels[@]}"
    if ! PYTHONPATH=$TARGET${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -c "import ddpm_plugin.export" 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$TARGET" .
    fi
}

run() {
    install_wheels
    export PYTHONPATH=$TARGET${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    local log=${OUT:-/tmp}/gpu_onnx_cuda.log pytorch=/tmp/gpu_onnx_cuda_pytorch.txt fresh=/tmp/gpu_onnx_cuda_results.md
    # onnx_cuda.py times PyTorch eager and bf16 + torch.compile itself; this re-checks the eager precisions and parity.
    local pytorch_args=${DDPM_CUDA_PYTORCH_ARGS:---batch-sizes 8,128 --steps 20 --repeats 3 --only paper-fp32,paper-bf16-weights}
    rm -f "$fresh" "$pytorch"
    # torch first: its CUDA 13 libraries are then already loaded when onnxruntime's CUDA provider looks for them.
    "$PYTHON" -c "import torch, onnxruntime as ort; from ddpm_plugin.export.providers import check_cuda; \
print('torch', torch.__version__, 'sees a GPU:', torch.cuda.is_available(), '| onnxruntime', ort.__version__, \
ort.get_available_providers(), '| CUDA for onnxruntime:', check_cuda().reason)" 2>&1 | tee "$log"
    # Each benchmark reports its own failure and writes nothing without a GPU; the other still runs.
    "$PYTHON" benchmarks/onnx_cuda.py --output "$fresh" ${DDPM_ONNX_CUDA_ARGS:-} 2>&1 | tee -a "$log" || true
    "$PYTHON" benchmarks/cuda_pytorch.py --bound-images 0 $pytorch_args 2>&1 | tee "$pytorch" | tee -a "$log" || true
    [[ -f $fresh ]] || { echo "gpu_onnx_cuda: no results, $RESULTS left as it was"; return 0; }
    if grep -q '^| ' "$pytorch"; then
        printf '\n## PyTorch on the same GPU, same run\n\n    python benchmarks/cuda_pytorch.py --bound-images 0 %s\n\n```\n%s\n```\n' \
            "$pytorch_args" "$(grep -v -i warn "$pytorch")" >> "$fresh"
    fi
    mv "$fresh" "$RESULTS"
    if [[ -n ${OUT:-} ]]; then cp "$RESULTS" "$OUT/"; fi
    echo "gpu_onnx_cuda: wrote $RESULTS"
}

case ${1:-} in
    split) shift; split_wheel "$@" ;;
    receive) shift; receive "$@" ;;
    install) install_wheels ;;
    run) run ;;
    *) fail "usage: $0 split WHEEL [DIR] | receive FILE... | install | run" ;;
esac
