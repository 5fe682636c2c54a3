"""The mutation suite: bugs planted one at a time in a copy of the project; the targeted tests must catch each.

Why a hand-kept list rather than mutmut or cosmic-ray: those mutate operators at random across the whole
tree and need hours of runs on 2 cores to reach the mechanisms that matter here (a wait kept for one tile,
a flag raised before its data, a kv head read from the wrong place), most of which are not one-operator
changes. Each mutant below is one realistic bug in one critical mechanism, with the tests that are meant
to catch it, so the whole suite runs in a few minutes and a surviving mutant names the gap.

    python scripts/mutants.py            # every mutant; exit 1 if any survives or no longer applies
    python scripts/mutants.py -k epoch   # those whose name contains "epoch"
    python scripts/mutants.py -k symm- --repeat 10   # killed only if killed in each of 10 runs
    make mutants

A mutant is *killed* when its tests fail (pytest exit 1). It *survives* when they pass. It is *broken* when
its snippet is no longer in the file (the code moved: update the table) or pytest cannot run (exit > 1):
both fail the suite too, so the table cannot rot silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = ("odykernels", "odysseus", "tests", "perf", "examples", "setup.cfg", "pyproject.toml", "README.md")


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    mechanism: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "half-wait",
        "waits: ag_matmul waits only in the first tile (M-tile 0, N-tile 0) of each chunk",
        "odykernels/ag_matmul.py",
        "        if chunk != rank:\n            wait_flag(",
        "        if (chunk != rank) & (row_start == tl.load(mtiles_ptr + mtile * TABLE_COLS + 3)) & (pid_n == 0):\n"
        "            wait_flag(",
        ("tests/test_kernels_late_data.py", "-k", "ag_matmul"),
    ),
    Mutant(
        "reduce-waits-once",
        "waits: reduce_slots waits for source 0's flag before reading every source's slot",
        "odykernels/matmul_rs.py",
        "        wait_flag(flags_ptr + src, epoch,",
        "        wait_flag(flags_ptr + 0, epoch,",
        ("tests/test_kernels_late_data.py", "-k", "reduce_slots"),
    ),
    Mutant(
        "epoch-stuck",
        "epochs: the symm workspace reuses epoch 1, so the previous call's flags satisfy this call's waits",
        "odysseus/overlap/symm.py",
        "self.epoch = self.epoch % (2**31 - 1) + 1",
        "self.epoch = 1",
        ("tests/test_symm.py", "-k", "late_pulls or reused"),
    ),
    Mutant(
        "flag-before-data",
        "transport (CUDA path): a pull's flag is written on the copy stream before the copy, not after it",
        "odysseus/overlap/transport/device.py",
        "            self.rt.copy(dst, src)\n            if flags is not None:\n"
        "                self.write_flag(flags, index, value)",
        "            if flags is not None:\n                self.write_flag(flags, index, value)\n"
        "            self.rt.copy(dst, src)",
        ("tests/test_symm_transport.py", "-k", "flag_written_before_its_copy"),
    ),
    Mutant(
        "early-notify",
        "waits: matmul_rs raises a destination's flag after its first tile instead of its last",
        "odykernels/matmul_rs.py",
        "    if done == dest_tiles - 1:",
        "    if done == 0:",
        ("tests/test_symm.py", "-k", "late_producer or parity"),
    ),
    Mutant(
        "slot-offset",
        "slot offsets: matmul_rs stores into the destination's slot, not the source's",
        "odykernels/matmul_rs.py",
        "slot_ptr = recv_ptr + offset + rank.to(tl.int64) * tl.multiple_of(stride_rs, VEC)",
        "slot_ptr = recv_ptr + offset + dest.to(tl.int64) * tl.multiple_of(stride_rs, VEC)",
        ("tests/test_kernels_numerics.py", "-k", "matmul_rs"),
    ),
    Mutant(
        "peer-offsets",
        "slot offsets: the symm backend gives the producer its own buffer for every peer",
        "odysseus/overlap/symm.py",
        "a, w, rows, rank, recv, data.peer_offsets(),",
        "a, w, rows, rank, recv, 0 * data.peer_offsets(),",
        ("tests/test_symm.py", "-k", "parity"),
    ),
    Mutant(
        "shard-rule",
        "shard rule: the extra tokens of an uneven split go to the last ranks instead of the first",
        "odysseus/layout.py",
        "return [q + 1 if i < r else q for i in range(world)]",
        "return [q + 1 if i >= world - r else q for i in range(world)]",
        ("tests/test_comm.py",),
    ),
    Mutant(
        "shard-slice",
        "shard rule: shard_sequence takes the previous rank's slice",
        "odysseus/comm/autograd.py",
        "return x.narrow(dim, o[r], sizes[r]).contiguous()",
        "return x.narrow(dim, o[max(r - 1, 0)], sizes[r]).contiguous()",
        ("tests/test_strategies_numerics.py", "-k", "block and odd"),
    ),
    Mutant(
        "rope-offset",
        "RoPE offset: Ulysses rotates every shard from position 0",
        "odysseus/strategies/ulysses.py",
        "pos = every[:, span.offset : span.offset + L_r]",
        "pos = every[:, :L_r]",
        ("tests/test_strategies_numerics.py", "-k", "ulysses"),
    ),
    Mutant(
        "kv-head-map",
        "kv-head mapping: a rank's query heads read kv heads counted from its first query head",
        "odysseus/layout.py",
        "kv_of_q = tuple(h // config.q_per_kv - ks for h in range(qs, qe))",
        "kv_of_q = tuple((h - qs) // config.q_per_kv for h in range(qs, qe))",
        ("tests/test_strategies_numerics.py", "-k", "odd"),
    ),
    Mutant(
        "norm-sync",
        "gradient sync: the norms of a sequence-split block are not summed over ranks",
        "odysseus/strategies/block.py",
        'sync = "sum" if self.spec.sequence_split and self.self_attn.world > 1 else "none"',
        'sync = "none"',
        ("tests/test_strategies_numerics.py", "-k", "block"),
    ),
    Mutant(
        "shared-kv-sync",
        "gradient sync: a kv head held by several ranks keeps each rank's partial gradient",
        "odysseus/strategies/head_split.py",
        'kv_sync = "sum" if self.heads.shared_kv else "none"',
        'kv_sync = "none"',
        ("tests/test_strategies_numerics.py", "-k", "odd"),
    ),
    Mutant(
        "ledger-bytes",
        "ledger bytes: an all-gather records one peer's share of the bytes it sends",
        "odysseus/layout.py",
        "return (len(sizes) - 1) * sizes[rank] * row_bytes, (sum(sizes) - sizes[rank]) * row_bytes",
        "return sizes[rank] * row_bytes, (sum(sizes) - sizes[rank]) * row_bytes",
        ("tests/test_volume.py",),
    ),
    Mutant(
        "zero3-keeps-weights",
        "ZeRO-3 reshard: zero3 keeps the gathered weights from forward to backward",
        "odysseus/training/state.py",
        'fsdp_kwargs.setdefault("reshard_after_forward", True)',
        'fsdp_kwargs.setdefault("reshard_after_forward", False)',
        ("tests/test_zero3_numerics.py", "tests/test_plan.py"),
    ),
    Mutant(
        "loss-shift",
        "loss shift: each shard's labels are shifted within the shard, losing the targets across boundaries",
        "odysseus/integrations/loss.py",
        "return shifted[:, offsets(sizes)[rank] : offsets(sizes)[rank + 1]]",
        "return _shift(labels[:, offsets(sizes)[rank] : offsets(sizes)[rank + 1]], ignore_index)",
        ("tests/test_hf_numerics.py",),
    ),
    Mutant(
        "not-causal",
        "attention: the causal mask is dropped",
        "odysseus/ops/attention.py",
        "is_causal=causal",
        "is_causal=False",
        ("tests/test_strategies_numerics.py", "-k", "block and odd"),
    ),
    Mutant(
        "row-bias-per-rank",
        "biases: o_proj's bias is added to every rank's partial product, so the sum holds it world times",
        "odysseus/strategies/head_split.py",
        "return out + self.o_proj.bias if c.o_bias else out",
        "return out + self.o_proj.bias * self.world if c.o_bias else out",
        ("tests/test_model_features.py", "-k", "block_parity and odysseus-naive-3"),
    ),
    Mutant(
        "packing-ignored",
        "packed sequences: head-split attention attends across document boundaries",
        "odysseus/strategies/head_split.py",
        "o = attend(ring, q, k, v, self.heads.kv_of_q, c.causal, None if position_ids is None else pos)",
        "o = attend(ring, q, k, v, self.heads.kv_of_q, c.causal, None)",
        ("tests/test_packed_sequences.py", "-k", "every_strategy_matches_reference and 3"),
    ),
    Mutant(
        "longrope-shard-max",
        "RoPE scaling: Ulysses picks longrope's factors from its own shard's largest position",
        "odysseus/strategies/ulysses.py",
        "longest = longest_position(ring, every, given) if self.rope.long_inv_freq",
        "longest = pos.max() if self.rope.long_inv_freq",
        ("tests/test_model_features.py", "-k", "longrope_uses_the_whole"),
    ),
    Mutant(
        "rope-scaling-ignored",
        "RoPE scaling: transformers' scaled frequencies are dropped for plain RoPE",
        "odysseus/ops/rope.py",
        "if self.inv_freq is None:",
        "if True:",
        ("tests/test_hf_models.py", "-k", "family_parity and llama-3"),
    ),
    Mutant(
        "clip-shared-rows",
        "clipping: rows several ranks hold (a kv head read by two ranks' query heads) count on each of them",
        "odysseus/training/clip.py",
        "    return min(max(s, before), e) - s, e - s",
        "    return 0, e - s",
        ("tests/test_training_loop.py", "-k", "clip_grad_norm_is_the_dense_norm"),
    ),
    Mutant(
        "autocast-fixed-dtype",
        "autocast: the overlap ops cast to bf16 whatever dtype the autocast context asks for",
        "odysseus/overlap/ops.py",
        "        dtype = torch.get_autocast_dtype(device_type)\n        cast = [",
        "        dtype = torch.bfloat16\n        cast = [",
        ("tests/test_training_loop.py", "-k", "autocast_fp16"),
    ),
    Mutant(
        "loss-chunk-ignored-rows",
        "chunked loss: backward keeps the softmax gradient of tokens whose label is ignored",
        "odysseus/ops/chunked_loss.py",
        "                d[~keep] = 0\n",
        "",
        ("tests/test_chunked_loss.py", "-k", "fp64_full_logits"),
    ),
    Mutant(
        "loss-chunk-last-chunk",
        "chunked loss: forward skips the last partial chunk of tokens",
        "odysseus/ops/chunked_loss.py",
        "            for s in range(0, hidden.shape[0], chunk):",
        "            for s in range(0, hidden.shape[0] - chunk + 1, chunk):",
        ("tests/test_chunked_loss.py", "-k", "fp64_full_logits"),
    ),
    Mutant(
        "checkpoint-ignored",
        "recompute: ParallelBlock with checkpoint=True runs the block without checkpointing",
        "odysseus/strategies/block.py",
        "        if self.checkpoint:\n",
        "        if False:\n",
        ("tests/test_recompute.py", "-k", "records_the_recompute"),
    ),
    Mutant(
        "ffn-tile-ignored",
        "tiled FFN: SeqParallelFFN runs the whole shard at once whatever ffn_tile says",
        "odysseus/strategies/ffn.py",
        "            if self.ffn_tile is None:\n                return self._ffn(x)\n",
        "            if True:\n                return self._ffn(x)\n",
        ("tests/test_recompute.py", "-k", "tiled_ffn_keeps"),
    ),
    Mutant(
        "norm-chunk-ignored",
        "RMSNorm: forward and backward take the whole token dim in one chunk, whatever RMSNORM_CHUNK_ROWS says",
        "odysseus/ops/rmsnorm.py",
        "    tokens = layout.norm_chunk_tokens(x.shape)\n",
        "    tokens = max(1, x.shape[-2])\n",
        ("tests/test_rmsnorm.py", "-k", "peak_is_the_plans_form or forward_holds"),
    ),
    Mutant(
        "norm-chunk-weight-grad-last",
        "RMSNorm backward: each chunk overwrites the weight gradient instead of adding to it",
        "odysseus/ops/rmsnorm.py",
        "        grad_w += (grad * x_hat",
        "        grad_w[:] = (grad * x_hat",
        ("tests/test_rmsnorm.py", "-k", "in_chunks"),
    ),
    Mutant(
        "mesh-default-group-unchecked",
        "2-D mesh: shard_sequence without a group splits over every replica's ranks without a word",
        "odysseus/comm/__init__.py",
        '    if group is None:\n        check_default_group("shard_sequence")\n',
        "",
        ("tests/test_mesh.py", "-k", "without_the_mesh"),
    ),
    Mutant(
        "mesh-dp-sum-dropped",
        "2-D mesh: finalize_grads sums over sp but forgets the data-parallel replicas",
        "odysseus/training/state.py",
        "        _sum_over_replicas(module, mesh)",
        "        pass",
        ("tests/test_mesh.py", "-k", "parity and device_mesh"),
    ),
    Mutant(
        "mesh-hsdp-summed-twice",
        "2-D mesh: finalize_grads sums over dp the gradients FSDP2 already reduced (hybrid and full ZeRO-3)",
        "odysseus/training/state.py",
        "    return len(ranks & set(dist.get_process_group_ranks(dp))) > 1",
        "    return False",
        ("tests/test_mesh.py", "-k", "parity and device_mesh"),
    ),
    Mutant(
        "mesh-hsdp-layout",
        "2-D mesh: the (dp, sp) layout handed to FSDP2 is not transposed for a mesh whose dims are (sp, dp)",
        "odysseus/comm/mesh.py",
        "        return layout if mesh.sp_dim == 1 else layout.t()",
        "        return layout",
        ("tests/test_mesh.py", "-k", "parity and reversed"),
    ),
    Mutant(
        "mesh-loss-count-local",
        "2-D mesh: causal_lm_loss divides by this replica's target count, not every replica's",
        "odysseus/integrations/loss.py",
        '        count = primitives.all_reduce(count, mesh.dp, category="metadata", label="token count")',
        "        pass",
        ("tests/test_mesh.py", "-k", "llama"),
    ),
    Mutant(
        "mesh-auto-ignores-hosts",
        "backend auto: symm is probed (and taken) on a group whose ranks span hosts",
        "odysseus/overlap/probe.py",
        "    if len(set(hosts)) > 1:\n        return False",
        "    if False:\n        return False",
        ("tests/test_mesh.py", "-k", "hosts"),
    ),
    Mutant(
        "ring-dkv-not-home",
        "ring: backward returns the dK/dV buffer it holds after R-1 hops instead of waiting for its own to come home",
        "odysseus/comm/ring.py",
        "        if travelling is not None:\n            dkv = travelling.wait()\n        return dq",
        "        if travelling is not None:\n            travelling.wait()\n        return dq",
        ("tests/test_ring.py", "-k", "pure_ring"),
    ),
    Mutant(
        "ring-merge-weight",
        "ring: the online softmax keeps the running output at the new block's weight (lse merge swapped)",
        "odysseus/ops/ring_attention.py",
        "    return out * w_old + block_out * w_new, new",
        "    return out * w_new + block_out * w_old, new",
        ("tests/test_ring.py", "-k", "blocks_merged"),
    ),
    Mutant(
        "ring-layout-unbalanced",
        "ring: ring rank i holds chunks i and i+R (contiguous halves) instead of one chunk from each end",
        "odysseus/layout.py",
        "for c in (i, 2 * ring - 1 - i)",
        "for c in (i, ring + i)",
        ("tests/test_ring.py", "-k", "layout"),
    ),
    # issue 22: loud by default (tests/test_loud.py)
    Mutant(
        "loud-frozen-carry",
        "frozen weights: a dense parameter's requires_grad is not carried to its shards",
        "odysseus/strategies/module.py",
        "    return dense.requires_grad if isinstance(dense, nn.Parameter) else True",
        "    return True",
        ("tests/test_loud.py", "-k", "frozen"),
    ),
    Mutant(
        "loud-frozen-norm",
        "frozen weights: a block's norms come back trainable",
        "odysseus/strategies/block.py",
        '                norm.weight.requires_grad_(trainable(weights[f"{name}.weight"]))',
        "                pass",
        ("tests/test_loud.py", "-k", "frozen_weights"),
    ),
    Mutant(
        "loud-frozen-finalize",
        "frozen weights: finalize_grads gives frozen replicated weights a zero gradient (AdamW decays them)",
        "odysseus/training/state.py",
        " or is_dtensor(p) or not p.requires_grad:",
        " or is_dtensor(p):",
        ("tests/test_loud.py", "-k", "frozen_weights"),
    ),
    Mutant(
        "loud-prints-split",
        "input check: identical shards on every rank of a sequence-split module pass",
        "odysseus/comm/prints.py",
        "    if not replicated and same and len(set(lengths)) == 1",
        "    if False and same and len(set(lengths)) == 1",
        ("tests/test_loud.py", "-k", "misfed_inputs"),
    ),
    Mutant(
        "loud-prints-tp",
        "input check: different inputs on the ranks of tp pass",
        "odysseus/comm/prints.py",
        "    if replicated and not same:",
        "    if False:",
        ("tests/test_loud.py", "-k", "misfed_inputs"),
    ),
    Mutant(
        "loud-prints-trivial",
        "input check: padding (one token repeated) on every rank is refused",
        "odysseus/comm/prints.py",
        "    trivial = torch.clamp(parts[0][2] + float(short), max=1.0)",
        "    trivial = torch.clamp(float(short) + parts[0][2] * 0, max=1.0)",
        ("tests/test_loud.py", "-k", "misfed_inputs"),
    ),
    Mutant(
        "loud-prints-hf-entry",
        "input check: parallelize_llama's hook never hands its print to the first layer",
        "odysseus/integrations/hf_hooks.py",
        "        first.self_attn.region.given_prints = (self.printer(tensors), self.HINT)",
        "        pass",
        ("tests/test_loud.py", "-k", "llama_inputs"),
    ),
    Mutant(
        "loud-prints-hf-labels",
        "input check: tp prints input_ids alone, not positions and labels",
        "odysseus/integrations/hf_hooks.py",
        '        tensors = [ids, given.get("position_ids"), self.labels] if self.replicated else [ids]',
        "        tensors = [ids]",
        ("tests/test_loud.py", "-k", "llama_inputs"),
    ),
    Mutant(
        "loud-shapes",
        "length exchange: a batch size that differs between ranks passes (gloo aborts later)",
        "odysseus/comm/lengths.py",
        "    if len({(b, h) for b, _, h in shapes}) > 1:",
        "    if False:",
        ("tests/test_loud.py", "-k", "batch_mismatch"),
    ),
    Mutant(
        "loud-local-check",
        "a module's input check is not run inside the length exchange (one rank raises alone)",
        "odysseus/strategies/regions.py",
        "            if check is not None:\n                check()",
        "            pass",
        ("tests/test_loud.py", "-k", "hidden_mismatch"),
    ),
    Mutant(
        "loud-weights",
        "same weights: per-rank weights pass parallelize",
        "odysseus/comm/weights.py",
        "        if len(set(values)) > 1:",
        "        if False:",
        ("tests/test_loud.py", "-k", "per_rank_weights"),
    ),
    Mutant(
        "loud-deepcopy-zero3",
        "deepcopy of a ZeRO-3 model reaches FSDP's assertion instead of the recipe",
        "odysseus/strategies/module.py",
        '    if any(hasattr(p, "placements") for p in module.parameters()):',
        "    if False:",
        ("tests/test_loud.py", "-k", "deepcopy"),
    ),
    # GPU-path mutants of the kernels (issue 21): memory order read from the PTX, programs in any order, the
    # interpreted TMA prefetch, the GPU-timer deadline on the CPU.
    Mutant(
        "gpu-wait-poll-plain-load",
        "memory order: wait_flag's timed poll reads the flag with a plain volatile load instead of an acquire",
        "odykernels/signal.py",
        'start < limit):\n                seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")',
        "start < limit):\n                seen = tl.load(flag_ptr, volatile=True)",
        ("tests/test_kernels_compile.py", "-k", "sm80-reduce_slots-pointer-bf16"),
    ),
    Mutant(
        "gpu-wait-first-read-gpu-scope",
        "memory order: wait_flag's first read of the flag is an acquire at GPU scope, not system scope",
        "odykernels/signal.py",
        '    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")\n    if seen != want:',
        '    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")\n    if seen != want:',
        ("tests/test_kernels_compile.py", "-k", "sm80-ag_matmul-pointer-bf16-64x64x64"),
    ),
    Mutant(
        "gpu-tma-spin-plain-load",
        "memory order: the TMA path's inline-PTX spin polls the flag with a plain ld.global",
        "odykernels/signal.py",
        "ld.global.acquire.sys.u32 $0, [$2];",
        "ld.global.u32 $0, [$2];",
        ("tests/test_kernels_compile.py", "-k", "sm90-ag_matmul-tma-bf16-64x64x64"),
    ),
    Mutant(
        "gpu-counter-relaxed",
        "memory order: matmul_rs's tile counter is a relaxed add, so the last tile's notify does not publish "
        "the other programs' tiles",
        "odykernels/matmul_rs.py",
        'done = tl.atomic_add(counters_ptr + dest, 1, sem="acq_rel", scope="sys")',
        'done = tl.atomic_add(counters_ptr + dest, 1, sem="relaxed", scope="sys")',
        ("tests/test_kernels_compile.py", "-k", "sm90-matmul_rs-tma-bf16-64x64x64"),
    ),
    Mutant(
        "gpu-notify-relaxed",
        "memory order: notify sets the flag with a relaxed exchange, no release",
        "odykernels/signal.py",
        'tl.atomic_xchg(flag_ptr, value.to(tl.uint32), sem="release", scope="sys")',
        'tl.atomic_xchg(flag_ptr, value.to(tl.uint32), sem="relaxed", scope="sys")',
        ("tests/test_kernels_compile.py", "-k", "sm80-matmul_rs-pointer-bf16-64x64x64"),
    ),
    Mutant(
        "gpu-lookahead-short",
        "lookahead: ag_matmul's TMA path acquires a tile's chunk num_stages - 1 iterations ahead, no earlier "
        "than the pipeline issues the tile's loads",
        "odykernels/ag_matmul.py",
        "    return cfg.num_stages\n",
        "    return cfg.num_stages - 1\n",
        ("tests/test_kernels_late_data.py", "-k", "any_program_order and tma"),
    ),
    Mutant(
        "gpu-clock-units",
        "deadline: the GPU-timer wait compares nanoseconds with the budget in microseconds (1000x too short)",
        "odykernels/signal.py",
        "            limit = limit * 1000  # microseconds -> the timer's nanoseconds",
        "            limit = limit  # microseconds -> the timer's nanoseconds",
        ("tests/test_kernels_emulation.py", "-k", "deadline"),
    ),
    Mutant(
        "gpu-tma-clock-units",
        "deadline: the TMA path's timed spin gets its budget in microseconds as nanoseconds (1000x too short)",
        "odykernels/signal.py",
        "limit = tl.where(earlier == 0, budget, 0).to(tl.int64) * 1000  # microseconds -> nanoseconds",
        "limit = tl.where(earlier == 0, budget, 0).to(tl.int64)  # microseconds -> nanoseconds",
        ("tests/test_kernels_emulation.py", "-k", "deadline and tma"),
    ),
    Mutant(
        "gpu-program-zero-waits",
        "program order: ag_matmul's program 0 acquires every chunk first and the others never wait (right only "
        "if program 0 runs first)",
        "odykernels/ag_matmul.py",
        "    for tile in range(tl.program_id(0), num_mtiles * num_pid_n, tl.num_programs(0)):\n"
        "        row_start, row_end, chunk, _, _, pid_n = "
        "chunk_tile(tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M)\n"
        "        if chunk != rank:\n",
        "    for t in range(tl.where(tl.program_id(0) == 0, 0, num_mtiles * num_pid_n), num_mtiles * num_pid_n):\n"
        "        _, _, c, _, _, _ = chunk_tile(t, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M)\n"
        "        if c != rank:\n"
        "            wait_flag(flags_ptr + c, expected, budget, status_ptr, c, t, USE_CLOCK)\n"
        "    for tile in range(tl.program_id(0), num_mtiles * num_pid_n, tl.num_programs(0)):\n"
        "        row_start, row_end, chunk, _, _, pid_n = "
        "chunk_tile(tile, num_mtiles, num_pid_n, mtiles_ptr, GROUP_M)\n"
        "        if (chunk != rank) & (chunk < 0):\n",
        ("tests/test_kernels_late_data.py", "-k", "any_program_order and pointer"),
    ),
    # GPU path, transport (issue 21): each killed 10 runs of 10 (make mutants, -k symm-).
    Mutant(
        "symm-ag-stage-barrier",
        "barriers: ag_matmul overwrites its stage without waiting for the peers still pulling the previous call",
        "odysseus/overlap/symm.py",
        "    stage.barrier(0, TIMEOUT_S)  # every peer has finished pulling this buffer's previous contents\n"
        "    mine = stage.local[: L_r * B * K].view(L_r, B, K)\n    engine.copy(",
        "    mine = stage.local[: L_r * B * K].view(L_r, B, K)\n    engine.copy(",
        ("tests/test_symm_transport.py", "-k", "back_to_back and copy-ag"),
    ),
    Mutant(
        "symm-rs-slot-barrier",
        "barriers: matmul_rs pushes into the peers' slots without waiting for them to reduce the previous call",
        "odysseus/overlap/symm.py",
        "    data.barrier(0, TIMEOUT_S)  # every peer has reduced the previous call's slots: they may be overwritten\n",
        "",
        ("tests/test_symm_transport.py", "-k", "back_to_back and reduction-rs"),
    ),
    Mutant(
        "symm-copy-wait-stream",
        "streams (CUDA path): pulls are not ordered after the current stream (copy_stream.wait_stream removed)",
        "odysseus/overlap/transport/device.py",
        "        self.rt.wait_stream(self.copy_stream, self.rt.current_stream())\n",
        "",
        ("tests/test_symm_transport.py", "-k", "back_to_back and copy-ag"),
    ),
    Mutant(
        "symm-epoch-wraps-to-zero",
        "epochs: a workspace's epoch wraps from 2**31 - 1 to 0, the never-written flag value",
        "odysseus/overlap/symm.py",
        "self.epoch = self.epoch % (2**31 - 1) + 1",
        "self.epoch = (self.epoch + 1) % 2**31",
        ("tests/test_symm_transport.py", "-k", "epochs_wrap"),
    ),
    Mutant(
        "symm-host-reads-early",
        "streams: ag_matmul returns without handing its outputs off (the host reads them before the kernel ran)",
        "odysseus/overlap/symm.py",
        "    engine.hand_off(_host_wait_s())  # the caller's torch ops read out and full\n",
        "",
        ("tests/test_symm.py", "-k", "block_parity_numerics and tp-sp-2"),
    ),
    Mutant(
        "symm-barrier-timeout-tag",
        "no device trap: a barrier's timeout is recorded as a GEMM wait's (tag = channel), so it is misreported",
        "odykernels/barrier.py",
        "base, -1 - channel, epoch, budget)",
        "base, channel, epoch, budget)",
        ("tests/test_symm.py", "-k", "dead_peer and barrier"),
    ),
]


def _copy_tree(dst: str) -> None:
    for name in COPY:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), ignore=shutil.ignore_patterns("__pycache__", "out"))
        elif os.path.exists(src):
            shutil.copy2(src, os.path.join(dst, name))


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, detail) with outcome one of killed, survived, broken."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ody-mutant-") as tmp:
        _copy_tree(tmp)
        path = os.path.join(tmp, mutant.path)
        with open(path) as f:
            text = f.read()
        if text.count(mutant.old) != 1:
            return "broken", 0.0, f"snippet found {text.count(mutant.old)} times in {mutant.path}"
        with open(path, "w") as f:
            f.write(text.replace(mutant.old, mutant.new))
        env = dict(os.environ, PYTHONPATH=tmp)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "broken", time.monotonic() - start, f"tests ran past {timeout:.0f} s"
    seconds = time.monotonic() - start
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 1:
        return "killed", seconds, last
    if proc.returncode == 0:
        return "survived", seconds, last
    return "broken", seconds, f"pytest exit {proc.returncode}: {(proc.stdout + proc.stderr)[-400:]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", default="", help="run only mutants whose name contains this")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant's tests")
    p.add_argument("--repeat", type=int, default=1, help="runs per mutant; killed only if killed in every run")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    if not chosen:
        print(f"no mutant name contains {args.k!r}", file=sys.stderr)
        return 2
    bad = 0
    print("| mutant | mechanism | outcome | time | tests' last line |\n|---|---|---|---|---|")
    for m in chosen:
        runs = [run(m, args.timeout) for _ in range(args.repeat)]
        outcome = next((o for o, _, _ in runs if o != "killed"), "killed")
        seconds, detail = sum(t for _, t, _ in runs), runs[-1][2]
        if args.repeat > 1:
            detail = f"{sum(o == 'killed' for o, _, _ in runs)} of {args.repeat} runs killed; {detail}"
        bad += outcome != "killed"
        print(f"| {m.name} | {m.mechanism} | {outcome} | {seconds:.0f} s | {detail[:160]} |", flush=True)
    print(f"\n{len(chosen) - bad} of {len(chosen)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
