"""How fast are odykernels' GEMMs next to cuBLAS, and what do ag_matmul's flag waits cost?

GPU only (prints why and exits 0 without one). Times, in bf16 with ``triton.testing.do_bench``:

* ``matmul`` vs ``torch.matmul`` (cuBLAS) at M = 8192 and 16384 and (K, N) = (4096, 1536), (512, 4096),
  (4096, 4096): the QKV projection of a 4096-wide model split over 8 ranks, its output projection's
  K slice, and a square layer;
* ``ag_matmul`` with every flag already set, against ``matmul`` on the same shape: world 1 (one chunk,
  the local one, so no flag is read: the cost of the M-tile table and the chunk-aware tiling) and world 8
  (seven of eight chunks remote: one acquire load of a set flag per tile, plus per-chunk tiling).

Prints ms, TFLOP/s and ratios, and appends the rows (card, date, versions) to perf/RESULTS.md under its
own section. Targets on an H100: matmul >= 0.9x cuBLAS; ag_matmul (world 1) within 5% of matmul.

    python perf/bench_kernels.py
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## odykernels GEMMs vs cuBLAS (perf/bench_kernels.py)"
HEADER = (
    "| date | card | torch | triton | M | K | N | cuBLAS ms | matmul ms | matmul TFLOP/s | matmul/cuBLAS time "
    "| ag w1 ms | ag w1/matmul time | ag w8 ms | ag w8/matmul time | config |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
MS = (8192, 16384)
KNS = ((4096, 3 * 4096 // 8), (4096 // 8, 4096), (4096, 4096))


def append_rows(rows: list[str]) -> None:
    """Add ``rows`` at the end of this script's section of RESULTS.md, creating file or section if needed."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Measured results\n"
    if SECTION not in text:
        intro = "bf16, `triton.testing.do_bench` medians. Time ratios: < 1 is faster."
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{intro}\n\n{HEADER}\n"
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt == -1 else nxt + 1
    section = text[start:end].rstrip("\n") + "\n" + "\n".join(rows) + "\n"
    if nxt != -1:
        section += "\n"
    with open(RESULTS, "w") as f:
        f.write(text[:start] + section + text[end:])


def bench_shape(M: int, K: int, N: int) -> dict:
    """Times (ms) of cuBLAS, matmul and ag_matmul (worlds 1 and 8, flags set) for one bf16 shape."""
    from triton.testing import do_bench

    from odykernels import ag_matmul, check_status, matmul, new_status, split_rows
    from odykernels.matmul import _matmul_kernel, config_for

    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16) / K**0.5
    out, ref = matmul(a, b), a @ b
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    if not err < 1e-2:
        raise RuntimeError(f"matmul disagrees with cuBLAS at {M}x{K}x{N}: relative error {err:.2e}")
    times = {"cublas": do_bench(lambda: torch.matmul(a, b)), "matmul": do_bench(lambda: matmul(a, b, out=out))}
    for world in (1, 8):
        flags = torch.ones(world, dtype=torch.int32, device="cuda")
        status = new_status("cuda")
        sizes = split_rows(M, world)
        times[f"ag{world}"] = do_bench(
            lambda: ag_matmul(a, b, sizes, 0, flags, 1, out=out, status=status, check=False)  # noqa: B023
        )
        check_status(status, 0, "ag_matmul")
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        if not err < 1e-2:
            raise RuntimeError(f"ag_matmul (world {world}) disagrees with cuBLAS at {M}x{K}x{N}: {err:.2e}")
    cfg = config_for(M, N, K, a.dtype, a.device, _matmul_kernel)
    times["config"] = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} g{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}"
    return times


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; nothing measured (this benchmark needs one).")
        return 0
    import triton

    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    versions = f"{card} | {torch.__version__} | {triton.__version__}"
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}")
    print("     M     K     N |   cuBLAS   matmul  TFLOP/s  ratio |    ag w1  ratio |    ag w8  ratio | config")
    rows = []
    for M in MS:
        for K, N in KNS:
            t = bench_shape(M, K, N)
            tflops = 2 * M * N * K / (t["matmul"] * 1e-3) / 1e12
            ratios = [t["matmul"] / t["cublas"], t["ag1"] / t["matmul"], t["ag8"] / t["matmul"]]
            print(
                f"{M:>6} {K:>5} {N:>5} | {t['cublas']:8.3f} {t['matmul']:8.3f} {tflops:8.1f} {ratios[0]:6.2f} | "
                f"{t['ag1']:8.3f} {ratios[1]:6.2f} | {t['ag8']:8.3f} {ratios[2]:6.2f} | {t['config']}"
            )
            rows.append(
                f"| {date} | {versions} | {M} | {K} | {N} | {t['cublas']:.3f} | {t['matmul']:.3f} | {tflops:.1f} "
                f"| {ratios[0]:.2f} | {t['ag1']:.3f} | {ratios[1]:.2f} | {t['ag8']:.3f} | {ratios[2]:.2f} "
                f"| {t['config']} |"
            )
    append_rows(rows)
    print(f"appended {len(rows)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
