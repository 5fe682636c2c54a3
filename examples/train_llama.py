"""Train a small Hugging Face Llama with every decoder layer split over the ranks by an odysseus strategy.

    torchrun --nproc-per-node 4 examples/train_llama.py --strategy odysseus --seq 8192
    torchrun --nproc-per-node 2 examples/train_llama.py --strategy ulysses --zero3 --data corpus.txt --save-every 100
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
        examples/train_llama.py --dp 2 --sp 8 --strategy odysseus --zero3 --seq 65536

The model is a ``transformers`` ``LlamaForCausalLM`` built from the size flags (random init, the same seed
on every rank), parallelized in place by ``odysseus.integrations.hf.parallelize_llama``. Data: without
``--data``, synthetic tokens from a fixed random Markov chain (mostly one likely successor per token, so
the loss has something to learn); with ``--data PATH``, random windows of the file's bytes (vocabulary 256).
The ranks form a 2-D mesh ``(dp, sp)`` (``--dp``, ``--sp``; their product is the world size, ``--sp``
defaults to all ranks): each layer is split over the ``sp`` ranks of its replica, each of the ``dp``
replicas draws its own ``--batch`` sequences (the rows of one global batch of ``dp * batch``, so a run with
``--dp 2 --batch 1`` sees what ``--dp 1 --batch 2`` does), and every rank feeds its sequence shard (``tp``:
the whole sequence). Ranks are laid out dp-major, so under ``torchrun --nnodes D --nproc-per-node S`` each
replica's ``sp`` group is one node and only the data-parallel gradient sum crosses nodes. ``--zero3`` shards
with ``odysseus.zero3``: ``--shard hybrid`` (the default with ``--dp`` above 1: shard within a replica,
replicate across), ``full`` (over every rank) or ``sp``. ``--ring R`` adds a ring dim between them, a
``(dp, ring, sp)`` mesh: each replica's sequence is split over ``ring x sp`` ranks, attention runs as a ring of
point-to-point K/V transfers over ``ring`` (past the head count, across nodes), ZeRO-3 shards over ``ring x sp``.

``--clip MAX`` clips the gradient to norm MAX with ``odysseus.clip_grad_norm_`` (the unsplit model's norm,
the same on every rank); the bar then shows that norm before clipping. ``--autocast`` runs the forward
pass under ``torch.autocast`` in bf16 (weights and optimizer stay fp32).

Long sequences: ``--checkpoint`` recomputes every layer in backward and keeps only its input (``--offload``
keeps that in host memory), ``--ffn-tile T`` runs the FFN T tokens per rank at a time, ``--loss-chunk C``
computes the LM head and the loss C tokens at a time without the full logits (Liger-Kernel's fused kernel
on CUDA when installed), ``--save-input shard`` keeps each rank's shard rather than the gathered sequence for
the weight gradients. ``python -m odysseus.plan ... --max-seq`` says which of them a length needs.

The progress bar (rank 0) shows the step, the global loss, tokens per second over all ranks (and per GPU) and the peak
memory of each rank: ``torch.cuda.max_memory_allocated`` on GPU, the peak resident set size
(``getrusage`` ``ru_maxrss``) of the process on CPU. ``--save-every K`` writes a checkpoint every K steps
(``DIR/step-K``: ``config.json`` + ``model.safetensors``, by rank 0) that
``LlamaForCausalLM.from_pretrained`` loads on one device. ``--metrics FILE`` writes the per-step losses (and the
parameters ZeRO-3 sharded) as JSON. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import odysseus
from odysseus.integrations.hf import (
    causal_lm_loss,
    finalize_model_grads,
    global_loss,
    model_loss,
    parallelize_llama,
    save_pretrained,
)
from odysseus.strategies import registry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=odysseus.STRATEGIES, default="odysseus")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (global, before splitting)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step and data-parallel replica")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (each its own batch)")
    p.add_argument("--ring", type=int, default=1, help="ring attention degree: the sequence over ring x sp ranks")
    p.add_argument("--sp", type=int, help="ranks each layer is split over (default: world size / (dp * ring))")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=256, help="synthetic data only; --data uses 256 (bytes)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--autocast", action="store_true", help="forward under torch.autocast in bf16")
    p.add_argument("--clip", type=float, default=0.0, help="clip the gradient norm to this value (0: off)")
    p.add_argument("--data", help="a text file to train on (byte-level tokens); synthetic tokens without it")
    p.add_argument("--zero3", action="store_true", help="shard the layers' replicated weights with FSDP2")
    p.add_argument("--shard", choices=("sp", "hybrid", "full"), help="--zero3 on a mesh: see odysseus.zero3")
    p.add_argument("--backend", default="auto", help="overlap backend of tp-sp/odysseus (odysseus.parallelize)")
    p.add_argument("--checkpoint", action="store_true", help="recompute each layer in backward (keep its input)")
    p.add_argument("--offload", action="store_true", help="with --checkpoint: keep the layer inputs in host memory")
    p.add_argument("--ffn-tile", type=int, help="run the FFN this many tokens per rank at a time (recomputed)")
    p.add_argument("--loss-chunk", type=int, help="LM head and loss this many tokens at a time (no full logits)")
    p.add_argument("--save-input", choices=("gathered", "shard"), default="gathered", help="see odysseus.parallelize")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0: never)")
    p.add_argument("--out", default="checkpoints", help="checkpoint directory")
    p.add_argument("--metrics", help="write the losses and the ZeRO-3-sharded parameter names as JSON (rank 0)")
    p.add_argument("--log-every", type=int, default=1, help="refresh the progress bar every N steps")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Batches:
    """A ``(batch, seq)`` int64 batch per step and data-parallel replica, from ``--data`` or a Markov chain: the
    rows of one global batch of ``replicas * batch`` rows drawn from the step's seed."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.data:
            with open(args.data, "rb") as f:
                self.corpus = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
            if len(self.corpus) <= args.seq:
                raise ValueError(f"--data {args.data} has {len(self.corpus)} bytes; --seq {args.seq} needs more")
            self.vocab = 256
        else:
            self.vocab = args.vocab
            g = torch.Generator().manual_seed(args.seed)
            self.successor = torch.randperm(self.vocab, generator=g)

    def get(self, step: int, replica: int = 0, replicas: int = 1) -> torch.Tensor:
        a, rows = self.args, self.args.batch * replicas
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        if a.data:
            starts = torch.randint(0, len(self.corpus) - a.seq, (rows,), generator=g)
            ids = torch.stack([self.corpus[s : s + a.seq] for s in starts.tolist()])
        else:
            ids = torch.empty(rows, a.seq, dtype=torch.long)
            ids[:, 0] = torch.randint(0, self.vocab, (rows,), generator=g)
            noise = torch.randint(0, self.vocab, (rows, a.seq), generator=g)
            follow = torch.rand(rows, a.seq, generator=g) < 0.9
            for t in range(1, a.seq):
                ids[:, t] = torch.where(follow[:, t], self.successor[ids[:, t - 1]], noise[:, t])
        return ids[replica * a.batch : (replica + 1) * a.batch]


def peak_memory_mib(device: torch.device) -> float:
    """GPU: peak allocated by torch; CPU: the process's peak resident set size (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_mesh(args: argparse.Namespace, device: torch.device):
    """The ``(dp, sp)`` DeviceMesh of the job, or ``(dp, ring, sp)`` with ``--ring`` above 1 (dp-major, sp
    innermost: the ``sp`` ranks of a ring rank are consecutive, so the head-parallel traffic stays in a node and
    only the ring's point-to-point hops and the data-parallel gradient sum cross nodes)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    sp = args.sp or world // (args.dp * args.ring)
    if args.dp < 1 or args.ring < 1 or args.dp * args.ring * sp != world:
        raise ValueError(f"--dp {args.dp} x --ring {args.ring} x --sp {sp} must equal the world size {world}")
    if args.ring > 1:
        return init_device_mesh(device.type, (args.dp, args.ring, sp), mesh_dim_names=("dp", "ring", "sp"))
    return init_device_mesh(device.type, (args.dp, sp), mesh_dim_names=("dp", "sp"))


def build_model(args: argparse.Namespace, vocab: int, device: torch.device, mesh) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        vocab_size=vocab,
        max_position_embeddings=args.seq,
        use_cache=False,
    )
    torch.manual_seed(args.seed)  # every rank builds the same weights; each then keeps its share
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    parallelize_llama(
        model, args.strategy, mesh, backend=args.backend, save_input=args.save_input,
        checkpoint=args.checkpoint, offload=args.offload, ffn_tile=args.ffn_tile,
    )  # fmt: skip
    if args.zero3:
        odysseus.zero3(model, shard=args.shard)
    return model


def train(args: argparse.Namespace) -> list[float]:
    """Run the training loop on this rank (torch.distributed must be initialised); returns the global losses."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = build_mesh(args, device)
    replica = mesh.get_local_rank("dp")
    data = Batches(args)
    model = build_model(args, data.vocab, device, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    split = registry.get(args.strategy).sequence_split  # "tp" takes the whole sequence on every rank
    losses: list[float] = []
    desc = f"{args.strategy} {args.dp}x{args.ring}x{world // (args.dp * args.ring)}"
    bar = tqdm(total=args.steps, disable=rank != 0, desc=desc, dynamic_ncols=True)
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        ids = data.get(step, replica, args.dp).to(device)
        x = odysseus.shard_sequence(ids, mesh) if split else ids
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            if args.loss_chunk:
                loss = model_loss(model, x, ids, chunk=args.loss_chunk)
            else:  # this rank's term of the mean over every replica's batch
                loss = causal_lm_loss(model(x).logits, ids, mesh)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        finalize_model_grads(model)
        norm = odysseus.clip_grad_norm_(model, args.clip) if args.clip else None
        opt.step()
        losses.append(global_loss(loss, model).item())  # .item() waits for the step: the time below is real
        elapsed = time.perf_counter() - start
        # The step's numbers and its count change together: set_postfix_str used to redraw the bar before
        # update(1) counted the step, so the bar showed step k-1 beside step k's loss.
        if step % args.log_every == 0 or step == args.steps:
            peaks = [None] * world
            dist.all_gather_object(peaks, round(peak_memory_mib(device)))
            shown = f"loss {losses[-1]:.4f}" + (f"  grad norm {norm.item():.3f}" if norm is not None else "")
            tokens = args.dp * args.batch * args.seq / elapsed
            postfix = f"{shown}  tok/s {tokens:,.0f} ({tokens / world:,.0f}/GPU)  peak MiB/rank {peaks}"
            bar.set_postfix_str(postfix, refresh=False)
            bar.update(1)
            bar.refresh()  # update() skips drawing within tqdm's mininterval of the last draw
        else:
            bar.update(1)
        if args.save_every and step % args.save_every == 0:
            save_pretrained(model, os.path.join(args.out, f"step-{step}"))
    bar.close()
    if args.metrics and rank == 0:
        sharded = [n for n, p in model.named_parameters() if hasattr(p, "placements")]  # FSDP2 DTensors
        with open(args.metrics, "w") as f:
            json.dump({"loss": losses, "zero3_sharded": sharded}, f)
    return losses


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
