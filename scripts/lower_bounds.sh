#!/usr/bin/env bash
# Runs the fast test suite with every dependency at the lower bound pyproject.toml declares
# (constraints/lower-bounds.txt), in a venv of its own (.venv-lower), to prove those bounds.
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf .venv-lower
python3 -m venv .venv-lower
pip() { .venv-lower/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# The machine's pip configuration may cap torch to the builds on its disk; the lower bound is another release.
PIP_CONSTRAINT="" pip install -q -c constraints/lower-bounds.txt -e ".[dev]"
.venv-lower/bin/python -c "import importlib.metadata as m; print('lower bounds:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'diffusers', 'accelerate', 'onnxruntime', 'openvino', 'gradio', 'huggingface_hub', 'numpy')))"
OMP_NUM_THREADS=1 .venv-lower/bin/python -m pytest -q -p no:cacheprovider -m "not slow and not browser"
