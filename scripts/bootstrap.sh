#!/usr/bin/env bash
# Ensure a Python environment with odysseus and its test extras; print that environment's bin dir.
# Uses the active venv if there is one, else creates ./.venv. Progress goes to stderr.
# An installed torch is never replaced: every install below runs under the constraint torch==<installed>.
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
# The installed torch's version and the triton it requires (CUDA wheels pin one; a CPU-only wheel none).
read -r TORCH TORCH_TRITON < <("$PY" - <<'EOF'
from importlib.metadata import requires, version

pins = [r.split(";")[0].strip() for r in requires("torch") or [] if r.startswith("triton")]
print(version("torch"), pins[0] if pins else "-")
EOF
)
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
echo "torch==$TORCH" >"$pins"
extra=()
if [ "$TORCH_TRITON" = "-" ]; then
  # A CPU-only torch: add the triton that the CUDA wheels of the same release pin (odykernels runs under
  # triton's interpreter on CPU, and compiles for sm_80/sm_90 without a GPU).
  case "${TORCH%%+*}" in
    2.11.*) extra=(triton==3.6.0) ;;
    2.13.*) extra=(triton==3.7.1) ;;
    2.15.*) extra=(triton==3.9.0) ;;
    *) echo "CPU-only torch $TORCH: no known triton for it; install the triton its CUDA wheels pin" >&2 ;;
  esac
fi
if ! "$PY" -m pip show -q odysseus >/dev/null 2>&1 \
   || ! "$PY" -c "import triton, transformers, accelerate, trl, pytest, hypothesis, matplotlib, numpy, einops, liger_kernel" 2>/dev/null; then
  echo "installing odysseus[test] ${extra[*]:-} (keeping torch $TORCH)" >&2
  # Through PIP_CONSTRAINT: it takes the place of a constraint file named in pip's config (which may cap
  # torch below the installed release) and keeps one the caller set.
  PIP_CONSTRAINT="$pins${PIP_CONSTRAINT:+ $PIP_CONSTRAINT}" "$PY" -m pip install -q -e ".[test]" "${extra[@]}" >&2
fi
echo "$BIN"
