#!/usr/bin/env bash
# Every GPU check in one command: GPU tests, kernel benchmark, layer benchmark. Logs and a short summary
# go to ${OUT:-perf/out/gpu}. Needs only what the GPU image has (torch, triton; no network, no flash-attn).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-perf/out/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/summary.md"
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "| $name | exit $rc | $((SECONDS - t0)) s | $(tail -n 1 "$out/$name.log" | cut -c1-120) |" | tee -a "$out/summary.md"
}
echo "| step | result | time | last line |" | tee -a "$out/summary.md"
echo "|---|---|---|---|" | tee -a "$out/summary.md"
step gpu_tests 300 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_numerics.py tests/test_overlap_gpu.py
step bench_kernels 150 "$py" perf/bench_kernels.py
if [ -f perf/bench_layer.py ]; then
  step bench_layer 150 "$py" perf/bench_layer.py --local-world 1 --device cuda
fi
step all_tests 400 "$py" -m pytest -q -p no:cacheprovider tests
cat "$out/summary.md"
