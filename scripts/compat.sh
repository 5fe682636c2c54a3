#!/usr/bin/env bash
# Test this checkout against one torch/triton pair, in a scratch venv of its own:
#
#   scripts/compat.sh TORCH TRITON            e.g. scripts/compat.sh 2.11.0 3.6.0
#
# Builds (or reuses) $COMPAT_VENVS/torch$TORCH-triton$TRITON (default /tmp/odysseus-compat; a CUDA
# wheel of torch is several GB) with python3.11 (or $PYTHON), installs the test extras through
# scripts/bootstrap.sh (which keeps that torch), then runs, with this checkout on PYTHONPATH: the kernel
# compile tests (sm_80/sm_90, no GPU needed), the interpreter numerics, the symm tests, the HF tests, the
# torch.compile tests, the demo and `perf/gpu_check.sh --dry-run`. Prints one row per selection and,
# with RESULTS=1, puts them in perf/RESULTS.md (section "compat", one row per release pair).
# Exit status: 0 only if every selection passed. CI runs the suite on one release only; this is by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 TORCH TRITON   (e.g. $0 2.11.0 3.6.0)" >&2; exit 2; }
torch_v=$1 triton_v=$2
venv="${COMPAT_VENVS:-/tmp/odysseus-compat}/torch$torch_v-triton$triton_v"
py="$venv/bin/python"
installed() { "$py" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0], m.version('triton'))"; }

if [ "$(installed 2>/dev/null)" != "$torch_v $triton_v" ]; then
  echo "building $venv" >&2
  [ -x "$py" ] || "${PYTHON:-python3.11}" -m venv "$venv" || exit 1
  pins="$(mktemp)"
  printf 'torch==%s\ntriton==%s\n' "$torch_v" "$triton_v" >"$pins"
  # PIP_CONSTRAINT replaces a constraint file named in pip's config, which may cap torch below TORCH.
  PIP_CONSTRAINT="$pins" "$py" -m pip install -q "torch==$torch_v" "triton==$triton_v" >&2 || exit 1
  rm -f "$pins"
  [ "$(installed)" = "$torch_v $triton_v" ] || { echo "$venv holds torch/triton $(installed)" >&2; exit 1; }
fi
VIRTUAL_ENV="$venv" scripts/bootstrap.sh >/dev/null || exit 1
[ "$(installed)" = "$torch_v $triton_v" ] || { echo "bootstrap changed torch/triton: $(installed)" >&2; exit 1; }

export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
logs="$(mktemp -d)"
rows=()
failed=0
run() {  # name, command...: one row "name | result | seconds"
  local name=$1 t0=$SECONDS rc result; shift
  "$@" >"$logs/$name.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  # pytest's closing line ("3 failed, 40 passed in 9.1s"), else the exit status.
  result=$(grep -E '^=* ?[0-9]+ (passed|failed|error)' "$logs/$name.log" | tail -n 1 | sed -E 's/=+//g; s/ in [0-9.]+s.*//; s/^ +//')
  [ -n "$result" ] || result="exit $rc"
  [ $rc -eq 0 ] || result="$result: FAILED"
  rows+=("$name|$result|$((SECONDS - t0))")
  echo "| $name | $result | $((SECONDS - t0)) s |$([ $rc -eq 0 ] || echo " $logs/$name.log")" >&2
}
pytest=("$py" -m pytest -q -p no:cacheprovider)
run compile "${pytest[@]}" tests/test_kernels_compile.py
run interpreter "${pytest[@]}" tests/test_kernels_numerics.py tests/test_kernels_late_data.py
run symm "${pytest[@]}" tests/test_symm.py
run hf "${pytest[@]}" tests/test_hf_api.py tests/test_hf_models.py tests/test_hf_numerics.py
run torch_compile "${pytest[@]}" tests/test_torch_compile.py tests/test_compile_cache.py
run demo "$py" -m odysseus.demo --world 2 --seq 128 --repeats 1
run gpu_check_dry_run env PYTHON="$py" OUT="$logs/gpu_check" bash perf/gpu_check.sh --dry-run

if [ "${RESULTS:-0}" = 1 ]; then
  "$py" - "${rows[@]}" <<'EOF' || failed=1
import re
import sys

sys.path.insert(0, "perf")
import torch
import triton
from common import RESULTS, machine, today, write_section

rows = [r.split("|") for r in sys.argv[1:]]  # name, result, seconds
head = "| torch | triton | python | date | machine | " + " | ".join(n for n, _, _ in rows) + " |"
begin, end = "<!-- begin compat -->", "<!-- end compat -->"
text = RESULTS.read_text()
old = text.split(begin, 1)[1].split(end, 1)[0] if begin in text else ""
this = f"| {torch.__version__} | {triton.__version__} |"
kept = [ln for ln in old.splitlines() if ln.startswith("| ") and not ln.startswith(("| torch |", this))]
py = ".".join(map(str, sys.version_info[:3]))
new = f"{this} {py} | {today()} | {machine()} | " + " | ".join(f"{res} ({s} s)" for _, res, s in rows) + " |"
body = [
    "## torch / triton releases (scripts/compat.sh)",
    "",
    "`RESULTS=1 scripts/compat.sh TORCH TRITON`: one row per release pair, replaced when that pair runs again.",
    "CPU only: the kernels compile for sm_80/sm_90 and run under the Triton interpreter; ranks are gloo",
    "processes. CI runs the whole suite on one release (the torch 2.13.0 CPU wheel).",
    "",
    head,
    "|" + "---|" * (5 + len(rows)),
    *sorted(kept + [new], key=lambda ln: [int(x) for x in re.findall(r"\d+", ln.split("|")[1])[:3]]),
]
write_section("compat", "\n".join(body))
EOF
fi
echo "logs: $logs" >&2
exit $failed
