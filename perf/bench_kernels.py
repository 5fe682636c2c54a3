"""odykernels' GEMMs next to cuBLAS at Llama tensor-parallel shapes, and ag_matmul fed by a live producer.

On a CUDA GPU, bf16:

* ``matmul`` vs ``torch.matmul`` (cuBLAS) at the world-8 TP shapes of Llama-2-7B, Llama-3-8B and
  Llama-2-70B for 8192 tokens (QKV, o_proj, fused gate/up, down; ``odykernels._compile.TP_SHAPES``) and a
  skinny N = d/8, with B laid out as odysseus passes it (``weight.t()``): TFLOP/s and cuBLAS time / ours
  (goal >= 0.95);
* ``ag_matmul`` with every flag set, world 1 (no flag read: the cost of the chunk-aware tiling) and
  world 8 (7 remote chunks), as time / matmul's (goal: world 1 within 3%);
* ``ag_matmul`` at world 8 with an in-process producer: a side stream copies the 7 remote chunks with
  copy-engine copies and writes each chunk's flag after its copy (``stream_write_value32`` when torch has
  it, else a 4-byte device-to-device copy: no SM needed either way), against copying first and then
  running ``matmul``, and against ``matmul`` alone (goal: within 5% of matmul alone).

Every result is checked against cuBLAS (relative error < 1e-2) before it is timed. GPU times are batches
of back-to-back calls queued behind a sleep kernel (``Env.time_ms``), so they are GPU time, not launch
overhead. Prints a table; with
``$OUT`` set also writes ``$OUT/bench_kernels.md`` and ``.json``; ``--append-results`` rewrites this
script's section of perf/RESULTS.md. Without a GPU it prints why and exits 0. ``--dry-run`` runs every
step on the CPU through the Triton interpreter at tiny shapes (both code paths, a thread standing in for
the producer stream) and exits 0 only if all of it ran. The GPU run stops adding shapes past
``--budget-s`` (default 80 s) and says which it skipped.

    python perf/bench_kernels.py [--dry-run] [--append-results] [--budget-s 80]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

from odykernels import ag_matmul, check_status, matmul, new_status, split_rows
from odykernels._chunks import chunk_starts
from odykernels._compile import TP_SHAPES
from odykernels.ag_matmul import prepare_ag_matmul
from odykernels.matmul import prepare_matmul
from odykernels.signal import FLAG_DTYPE

SECTION = "bench_kernels"
WORLD = 8
# The shapes whose A is all-gathered in sequence-parallel TP (the producer benchmark's subjects).
PRODUCER_SHAPES = ("qkv", "gate/up")
GPU_TIMEOUT_S = 2.0  # bound on one flag wait in the benchmark: a lost flag costs 2 s, not the default 30


def tiny(shape: tuple[str, int, int, int]) -> tuple[str, int, int, int]:
    """The dry run's stand-in for a shape: 61 rows (ragged over 8 ranks), K and N / 256 rounded up to 16."""
    label, _, K, N = shape
    return label, 61, max(16, -(-K // 256 // 16) * 16), max(16, -(-N // 256 // 16) * 16)


class Env:
    """What differs between the GPU run and the CPU dry run: device, dtype, timer, producer, tolerance."""

    def __init__(self, dry_run: bool):
        self.dry = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype = torch.float16 if dry_run else torch.bfloat16
        self.tol = 5e-3 if dry_run else 1e-2
        self.epoch = 0
        self._write_value32 = None
        if not dry_run:
            self._epochs = torch.arange(1, 1 << 16, dtype=torch.int64).to(FLAG_DTYPE).to(self.device)
            try:  # the copy-engine write symmetric memory uses; probed, since its dtype rules vary by torch version
                from torch.distributed._symmetric_memory import _SymmetricMemory

                write = _SymmetricMemory.stream_write_value32
                probe = torch.zeros(2, dtype=FLAG_DTYPE, device=self.device)
                write(probe, 1, 7)
                torch.cuda.synchronize()
                if probe.cpu().to(torch.int64).tolist() == [0, 7]:
                    self._write_value32 = write
            except Exception:  # not available: a 4-byte device-to-device copy, also done by a copy engine
                pass

    @property
    def flag_writer(self) -> str:
        if self.dry:
            return "thread stores (CPU stand-in)"
        return "stream_write_value32" if self._write_value32 else "4-byte D2D copy"

    def time_ms(self, fn) -> float:
        """ms per call of ``fn``: on a GPU, the median of 3 batches of back-to-back calls queued behind a
        ~50 ms sleep kernel, so host-side launch overhead (Python, argument checks) never leaves the GPU
        idle and only GPU time is measured; L2 is not flushed between calls (the same for every kernel).
        On the CPU, one timed call after a warm-up."""
        fn()
        if self.dry:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        calls = max(1, min(50, int(10.0 / max(start.elapsed_time(end), 1e-3))))  # ~10 ms of GPU work a batch
        batches = []
        for _ in range(3):
            torch.cuda._sleep(100_000_000)  # ~50 ms at H100 clocks: the host queues the batch meanwhile
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            batches.append(start.elapsed_time(end) / calls)
        return sorted(batches)[1]

    def next_epoch(self, flags: torch.Tensor) -> int:
        self.epoch += 1
        if not self.dry and self.epoch >= self._epochs.numel():  # wrap: a clean slate, synchronously
            torch.cuda.synchronize()
            flags.zero_()
            self.epoch = 1
        return self.epoch

    def write_flag(self, flags: torch.Tensor, index: int, epoch: int) -> None:
        """Set ``flags[index] = epoch`` from the current stream without a kernel (no SM needed)."""
        if self.dry:
            flags[index] = epoch
        elif self._write_value32 is not None:
            self._write_value32(flags, index, epoch)
        else:
            flags[index : index + 1].copy_(self._epochs[epoch - 1 : epoch])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = rel_err(got, ref)
    if not err < tol:  # NaN fails too
        raise RuntimeError(f"{what}: relative error {err:.2e} vs torch.matmul (limit {tol:.0e})")


def bench_shape(env: Env, label: str, M: int, K: int, N: int) -> dict:
    """cuBLAS, matmul (auto path), ag_matmul at worlds 1 and 8 with flags set: times and checks."""
    g = torch.Generator(device=env.device).manual_seed(0)
    a = torch.randn(M, K, device=env.device, dtype=env.dtype, generator=g)
    w = torch.randn(N, K, device=env.device, dtype=env.dtype, generator=g) / K**0.5
    b = w.t()  # odysseus passes nn.Linear weights transposed: K contiguous
    ref = torch.matmul(a.float(), b.float()) if env.dry else torch.matmul(a, b)
    out = torch.full((M, N), float("nan"), device=env.device, dtype=env.dtype)
    row = {"shape": label, "M": M, "K": K, "N": N}
    paths = ("pointer", "tma") if env.dry else (None,)  # the dry run exercises both paths explicitly
    for path in paths:
        launch = prepare_matmul(a, b, out, path=path)
        launch.run()
        check(out, ref, env.tol, f"matmul {label} path={path}")
        kw = launch.kwargs
        row["path"] = "tma" if "A_COL_MAJOR" in kw else "pointer"
        row["config"] = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{kw['num_warps']} s{kw['num_stages']}"
        row["matmul_ms"] = env.time_ms(launch.run)
    cublas_out = torch.empty_like(out) if not env.dry else None
    row["cublas_ms"] = env.time_ms(lambda: torch.matmul(a, b, out=cublas_out) if cublas_out is not None else a @ b)
    row["tflops"] = 2 * M * N * K / (row["matmul_ms"] * 1e-3) / 1e12
    status = new_status(env.device)
    for world in (1, WORLD):
        flags = torch.ones(world, dtype=FLAG_DTYPE, device=env.device)
        sizes = split_rows(M, world)
        out.fill_(float("nan"))

        launch = prepare_ag_matmul(a, b, sizes, 0, flags, 1, out=out, timeout_s=GPU_TIMEOUT_S, status=status)
        run = launch.run
        run()
        check_status(status, 0, "ag_matmul")
        check(out, ref, env.tol, f"ag_matmul world {world} {label}")
        row[f"ag{world}_ms"] = env.time_ms(run)
    check_status(status, 0, "ag_matmul")
    return row


def bench_producer(env: Env, label: str, M: int, K: int, N: int) -> dict:
    """ag_matmul at world 8 fed by a live producer vs copy-then-matmul vs matmul alone (rank 0's view)."""
    g = torch.Generator(device=env.device).manual_seed(1)
    src = torch.randn(M, K, device=env.device, dtype=env.dtype, generator=g)
    b = (torch.randn(N, K, device=env.device, dtype=env.dtype, generator=g) / K**0.5).t()
    ref = torch.matmul(src.float(), b.float()) if env.dry else torch.matmul(src, b)
    sizes = split_rows(M, WORLD)
    starts = chunk_starts(sizes)
    remote = [slice(starts[c], starts[c + 1]) for c in range(1, WORLD)]  # rank 0's chunk is already local
    a_full = src.clone()
    out = torch.empty(M, N, device=env.device, dtype=env.dtype)
    flags = torch.zeros(WORLD, dtype=FLAG_DTYPE, device=env.device)
    status = new_status(env.device)

    def poison():
        for rows in remote:
            a_full[rows] = float("nan")

    def copy_chunks(epoch: int | None):
        for c, rows in enumerate(remote, start=1):
            a_full[rows].copy_(src[rows])
            if epoch is not None:
                env.write_flag(flags, c, epoch)

    def copy_then_matmul():
        copy_chunks(None)
        matmul(a_full, b, out=out)

    if env.dry:

        def fused():
            epoch = env.next_epoch(flags)
            producer = threading.Thread(target=lambda: (time.sleep(0.01), copy_chunks(epoch)))
            producer.start()
            try:
                ag_matmul(a_full, b, sizes, 0, flags, epoch, out=out, timeout_s=60, status=status, check=False)
            finally:
                producer.join()

    else:
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()

        def fused():
            epoch = env.next_epoch(flags)
            side.wait_stream(main)  # the previous call's readers are done before the chunks are rewritten
            with torch.cuda.stream(side):
                copy_chunks(epoch)
            ag_matmul(a_full, b, sizes, 0, flags, epoch, out=out, timeout_s=GPU_TIMEOUT_S, status=status, check=False)
            main.wait_stream(side)

    row = {"shape": label, "M": M, "K": K, "N": N, "flag_writer": env.flag_writer}
    for name, fn in (("copy_then_matmul", copy_then_matmul), ("fused", fused)):
        poison()
        out.fill_(float("nan"))
        fn()
        check_status(status, 0, "ag_matmul")
        check(out, ref, env.tol, f"{name} {label}")
        row[f"{name}_ms"] = env.time_ms(fn)
        check_status(status, 0, "ag_matmul")
    row["matmul_ms"] = env.time_ms(lambda: matmul(a_full, b, out=out))
    return row


def fmt(rows: list[dict], producer_rows: list[dict]) -> str:
    """Both tables in markdown."""
    lines = [
        common.markdown_table(
            ["shape", "M", "K", "N", "path", "config", "cuBLAS ms", "matmul ms", "TFLOP/s", "cuBLAS/matmul",
             "ag w1 ms", "ag w1/matmul", f"ag w{WORLD} ms", f"ag w{WORLD}/matmul"],
            [[r["shape"], r["M"], r["K"], r["N"], r["path"], r["config"], f"{r['cublas_ms']:.3f}",
              f"{r['matmul_ms']:.3f}", f"{r['tflops']:.1f}", f"{r['cublas_ms'] / r['matmul_ms']:.3f}",
              f"{r['ag1_ms']:.3f}", f"{r['ag1_ms'] / r['matmul_ms']:.3f}", f"{r[f'ag{WORLD}_ms']:.3f}",
              f"{r[f'ag{WORLD}_ms'] / r['matmul_ms']:.3f}"] for r in rows],
        ),
        "",
        f"ag_matmul at world {WORLD} with a live producer (rank 0; 7 chunks copied, then flagged):",
        "",
        common.markdown_table(
            ["shape", "M", "K", "N", "flag writer", "copy+matmul ms", "fused ms", "matmul alone ms",
             "fused/matmul alone", "fused/copy+matmul"],
            [[r["shape"], r["M"], r["K"], r["N"], r["flag_writer"], f"{r['copy_then_matmul_ms']:.3f}",
              f"{r['fused_ms']:.3f}", f"{r['matmul_ms']:.3f}", f"{r['fused_ms'] / r['matmul_ms']:.3f}",
              f"{r['fused_ms'] / r['copy_then_matmul_ms']:.3f}"] for r in producer_rows],
        ),
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes, every step (for CI)")
    p.add_argument("--append-results", action="store_true", help="rewrite this script's perf/RESULTS.md section")
    p.add_argument("--budget-s", type=float, default=80.0, help="stop adding shapes after this many seconds")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA GPU here; nothing measured (this benchmark needs one; --dry-run checks it on CPU)"
        )
        return 0
    import triton

    env = Env(args.dry_run)
    device_name = "CPU (Triton interpreter), dry run" if env.dry else torch.cuda.get_device_name()
    header = f"{device_name}; torch {torch.__version__}, triton {triton.__version__}; {common.today()}"
    print(header, flush=True)
    shapes = [tiny(s) for s in TP_SHAPES] if env.dry else TP_SHAPES
    start = time.monotonic()
    rows, producer_rows, skipped, failures = [], [], [], []
    for shape in shapes:
        if time.monotonic() - start > args.budget_s and not env.dry:
            skipped.append(shape[0])
            continue
        try:
            rows.append(bench_shape(env, *shape))
            r = rows[-1]
            print(
                f"{r['shape']:>20} {r['M']:>6} {r['K']:>5} {r['N']:>5} {r['path']:>7} | cuBLAS {r['cublas_ms']:8.3f} "
                f"matmul {r['matmul_ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s x{r['cublas_ms'] / r['matmul_ms']:.3f} | "
                f"ag w1 x{r['ag1_ms'] / r['matmul_ms']:.3f} w{WORLD} x{r[f'ag{WORLD}_ms'] / r['matmul_ms']:.3f}",
                flush=True,
            )
            if any(shape[0].endswith(k) for k in PRODUCER_SHAPES):
                producer_rows.append(bench_producer(env, *shape))
                r = producer_rows[-1]
                print(
                    f"{'':>20} producer: copy+matmul {r['copy_then_matmul_ms']:8.3f} fused {r['fused_ms']:8.3f} "
                    f"matmul alone {r['matmul_ms']:8.3f} ms (x{r['fused_ms'] / r['matmul_ms']:.3f})",
                    flush=True,
                )
        except Exception as e:  # record, go on with the other shapes, fail at the end
            failures.append(f"{shape[0]}: {type(e).__name__}: {e}")
            traceback.print_exc()
    text = fmt(rows, producer_rows)
    notes = [f"skipped past the {args.budget_s:.0f} s budget: {', '.join(skipped)}"] if skipped else []
    notes += [f"FAILED {f}" for f in failures]
    body = "\n\n".join([f"`{common.command_line()}`: {header}", text, *notes])
    print("\n" + body)
    if os.environ.get("OUT"):
        out_dir = Path(os.environ["OUT"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_kernels.md").write_text(body + "\n")
        payload = {"header": header, "rows": rows, "producer": producer_rows, "skipped": skipped, "failures": failures}
        (out_dir / "bench_kernels.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out_dir / 'bench_kernels.md'} and .json")
    if args.append_results:
        if env.dry:
            print("--append-results: a dry run's numbers are not results; perf/RESULTS.md left alone")
        else:
            common.write_section(SECTION, f"## odykernels GEMMs vs cuBLAS (perf/bench_kernels.py)\n\n{body}")
            print(f"rewrote the {SECTION} section of {common.RESULTS}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
