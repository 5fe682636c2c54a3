#!/usr/bin/env bash
# The one-shot GPU check, at most 8 minutes on one H100 (torch 2.11 + triton 3.6, or newer):
#   1. env            the card, torch and triton
#   2. kernel_tests   the GPU kernel tests (pytest -m gpu): numerics, late data on a copy stream; the input print
#                     read one call late (tests/test_loud.py)
#   3. symm_tests     the symm backend on one GPU at worlds 2-4 (spawned ranks sharing the device):
#                     fp32 parity of every gradient at 1e-5, bf16, shrinking/growing lengths, a stress run
#                     with late copies over many epochs, a silent producer that must time out
#   4. bench_kernels  GEMM TFLOP/s against cuBLAS at Llama TP shapes, ag_matmul fed by a copy-engine producer
# Every log and summary.md go to $OUT (else perf/out/gpu). Exit status: 0 only if every step passed.
#
#   bash perf/gpu_check.sh            on the GPU machine
#   bash perf/gpu_check.sh --dry-run  on a CPU (CI): the same command lines, each validated (pytest collects
#                                     its selection, the benchmark parses its arguments), and every step that
#                                     can run on a CPU run at tiny shapes through the Triton interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
out="${OUT:-perf/out/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1
py="${PYTHON:-python3}"
failed=0

step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || failed=1
  echo "| $name | exit $rc | $((SECONDS - t0)) s / $limit s | $(tail -n 1 "$out/$name.log" | cut -c1-120) |" | tee -a "$out/summary.md"
}

# The command lines, shared by both modes so the dry run checks exactly what the GPU run executes.
kernel_tests=("$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_numerics.py tests/test_kernels_late_data.py tests/test_loud.py)
symm_tests=("$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_overlap_gpu.py)
bench_kernels=("$py" perf/bench_kernels.py)
versions=("$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)")

echo "# GPU check $(date -u +%FT%TZ)$([ $dry -eq 1 ] && echo ' (dry run, CPU)')" | tee "$out/summary.md"
echo "| step | result | time | last line |" | tee -a "$out/summary.md"
echo "|---|---|---|---|" | tee -a "$out/summary.md"
if [ $dry -eq 1 ]; then
  step env 60 "${versions[@]}"
  step kernel_tests 120 "${kernel_tests[@]}" --collect-only
  step symm_tests 120 "${symm_tests[@]}" --collect-only
  step symm_cpu 300 "$py" -m pytest -q -p no:cacheprovider tests/test_symm.py -k "parity or late"
  step bench_kernels 300 "${bench_kernels[@]}" --dry-run
  # A selection that collects nothing is a broken command line, not a pass.
  for name in kernel_tests symm_tests; do
    grep -Eq "^[0-9]+ tests? collected|^[0-9]+/[0-9]+ tests collected" "$out/$name.log" \
      || { echo "| $name | collected no test | | |" | tee -a "$out/summary.md"; failed=1; }
  done
else
  step env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; ${versions[*]@Q}"
  step kernel_tests 140 "${kernel_tests[@]}"
  step symm_tests 200 "${symm_tests[@]}"
  step bench_kernels 90 "${bench_kernels[@]}"
fi
cat "$out/summary.md"
exit $failed
