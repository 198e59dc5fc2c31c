#!/usr/bin/env bash
# Creates .venv with everything ddpm-plugin needs; safe to run again (it only adds what is missing).
#   scripts/setup.sh            the package, for `ddpm ...`
#   scripts/setup.sh --dev      plus the test tools and Debian's chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: the 2.13.0 CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
  if ! command -v chromium >/dev/null 2>&1; then
    # The browser tests drive Debian's chromium through Playwright; no browser download.
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null;
    else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
