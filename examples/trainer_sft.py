"""Supervised fine-tuning with Hugging Face Trainer, sequence-parallel: a dense Trainer script with two lines changed.

    python examples/trainer_sft.py --dense                      # the dense Trainer, one process
    torchrun --nproc-per-node 2 examples/trainer_sft.py         # OdysseusTrainer, the model split over 2 ranks
    torchrun --nproc-per-node 4 examples/trainer_sft.py --sp 2 --zero3   # 2 replicas x 2 ranks, ZeRO-3
    torchrun --nproc-per-node 8 examples/trainer_sft.py --model PATH --sp 8 --checkpoint --loss-chunk 4096

The data is a chat dataset in the usual public format (``{"messages": [{"role": "user", ...}, {"role":
"assistant", ...}]}``, as TRL's SFT datasets are), made in the script: arithmetic questions and their answers.
A byte-level tokenizer (no download) turns each conversation into ``input_ids`` and ``labels`` that score the
assistant's answer only; ``DataCollatorWithFlattening`` packs each batch into one row, with ``position_ids``
that restart at every conversation. The model is ``--model PATH`` (``from_pretrained``: a Llama, Qwen2 or
Mistral checkpoint whose vocabulary holds the 256 byte ids) or a small fresh Llama.

Both runs log the same losses and gradient norms (the whole job trains on ``--batch`` conversations per
micro-step however it is split) and save checkpoints that ``from_pretrained`` loads on one device.
``--metrics FILE`` writes the logged steps as JSON. On a machine without GPUs the ranks use gloo
(``use_cpu=True``).
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from odysseus.integrations.trainer import OdysseusTrainer

IGNORE = -100  # label of tokens without a loss (the user's turn)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", action="store_true", help="the plain transformers.Trainer (one process)")
    p.add_argument("--strategy", default="odysseus", help="one of odysseus.STRATEGIES")
    p.add_argument("--sp", type=int, help="ranks of each sp group (default: every rank of a replica)")
    p.add_argument("--ring", type=int, default=1, help="ring attention degree around the sp groups (default 1)")
    p.add_argument("--zero3", action="store_true", help="shard the layers' replicated weights (odysseus.zero3)")
    p.add_argument("--checkpoint", action="store_true", help="recompute every layer in backward")
    p.add_argument("--loss-chunk", type=int, help="LM head and loss this many tokens at a time")
    p.add_argument("--model", help="a from_pretrained path; default: a small fresh Llama")
    p.add_argument("--examples", type=int, default=256, help="conversations in the dataset")
    p.add_argument("--batch", type=int, default=8, help="conversations per micro-step (per_device_train_batch_size)")
    p.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments(bf16=True))")
    p.add_argument("--out", default="sft-out", help="output_dir: checkpoints every --save-every steps")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--metrics", help="write the logged steps (loss, grad_norm, learning_rate) as JSON")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def conversations(n: int, seed: int) -> list[dict]:
    """``n`` chats in the public messages format: a sum or difference asked, the answer given."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-")
        answer = a + b if op == "+" else a - b
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} {op} {b}?"},
                    {"role": "assistant", "content": f"{a} {op} {b} = {answer}."},
                ]
            }
        )
    return out


def tokenize(chat: dict) -> dict:
    """Bytes of "User: ...\\nAssistant: ...\\n"; labels score the assistant's reply only."""
    ids, labels = [], []
    for turn in chat["messages"]:
        prompt = f"{turn['role'].capitalize()}: ".encode()
        text = f"{turn['content']}\n".encode()
        ids += list(prompt) + list(text)
        scored = turn["role"] == "assistant"
        labels += [IGNORE] * len(prompt) + (list(text) if scored else [IGNORE] * len(text))
    return {"input_ids": ids, "labels": labels}


def build_model(path: str | None, seed: int) -> torch.nn.Module:
    if path:
        return AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(seed)  # the same weights on every rank and in the dense run
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=344, vocab_size=256, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> list[dict]:
    """Train; returns the logged steps (every rank)."""
    a = parse_args(argv)
    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.accumulate,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, a.steps // 10),
        max_grad_norm=1.0,
        bf16=a.bf16,
        logging_steps=1,
        save_steps=a.save_every,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=a.seed,
    )
    train = [tokenize(chat) for chat in conversations(a.examples, a.seed)]
    collator = DataCollatorWithFlattening()  # packing: no padding, position_ids restart per conversation
    model = build_model(a.model, a.seed)
    if a.dense:
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    else:  # the two-line change: this class (and its import), and sp_size
        trainer = OdysseusTrainer(
            model=model, args=args, train_dataset=train, data_collator=collator,
            strategy=a.strategy, sp_size=a.sp, ring_size=a.ring, zero3=a.zero3, checkpoint=a.checkpoint,
            loss_chunk=a.loss_chunk,
        )  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    if a.metrics and trainer.is_world_process_zero():
        with open(a.metrics, "w") as f:
            json.dump(logged, f)
    return logged


if __name__ == "__main__":
    main()
