#!/usr/bin/env bash
# Ensure a Python environment with odysseus and its test extras; print that environment's bin dir.
# Uses the active venv if there is one, else creates ./.venv. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
  BIN="$VIRTUAL_ENV/bin"
else
  [ -x .venv/bin/python ] || { echo "creating .venv" >&2; python3 -m venv .venv; }
  BIN="$PWD/.venv/bin"
fi
PY="$BIN/python"
# A bare `torch` requirement would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel on these machines.
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "installing torch==2.13.0" >&2
  "$PY" -m pip install -q torch==2.13.0 >&2
fi
if ! "$PY" -m pip show -q odysseus >/dev/null 2>&1 \
   || ! "$PY" -c "import triton, transformers, accelerate, trl, pytest, hypothesis, matplotlib, numpy, einops, liger_kernel" 2>/dev/null; then
  echo "installing odysseus[test]" >&2
  "$PY" -m pip install -q -e ".[test]" >&2
fi
echo "$BIN"
