"""OdysseusTrainer against the dense single-process transformers.Trainer with the same TrainingArguments and data:
logged losses, gradient norms and learning rates, final weights, the checkpoints from_pretrained loads, and a run
resumed from a mid-run checkpoint; at world 2 (Llama, sp 2, the long-sequence options) and 4 (Qwen2 with tied
embeddings, 2 x 2 dp x sp, packed sequences, ZeRO-3). Then the misuse it refuses, on every rank; the example
script under torchrun; OdysseusSFTTrainer against TRL's SFTTrainer.

The ranks are forked gloo processes (run_ranks); the variables torchrun would set tell accelerate the layout, and
the process group is the one run_ranks made."""

import os

import pytest
import torch
from helpers import assert_close
from multirank import run_ranks
from transformers import (
    DataCollatorWithFlattening,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

TOL = dict(rtol=1e-5, atol=1e-5)
SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=128)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES, intermediate_size=112, attn_implementation="eager")),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(**SIZES, intermediate_size=112, tie_word_embeddings=True, attn_implementation="eager")
    ),
}
# Clipping is active (every step's norm is above 0.5), the cosine schedule warms up over the first step, and
# two micro-batches of 4 sequences make each of the 4 steps; a checkpoint and an evaluation every 2 steps.
ARGS = dict(
    per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, weight_decay=0.01,
    lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=0.5, logging_steps=1, save_strategy="steps",
    save_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, report_to="none", use_cpu=True,
    seed=0, disable_tqdm=True,
)  # fmt: skip


def model(name: str):
    torch.manual_seed(0)
    return MODELS[name]()


def dataset(packed: bool, n: int = 16, seed: int = 1) -> list[dict]:
    """``n`` examples: 29 tokens each (odd: uneven shards), or 5 to 19 tokens for packing; some labels ignored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n = int(torch.randint(5, 20, (1,), generator=g)) if packed else 29
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        labels = list(ids)
        labels[2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def logged(trainer, after: int = 0) -> list[tuple[float, ...]]:
    """(loss, grad_norm, learning_rate) of each logged step after step ``after``, then each evaluation's loss."""
    rows = [h for h in trainer.state.log_history if h["step"] > after]
    steps = [(h["loss"], h["grad_norm"], h["learning_rate"]) for h in rows if "loss" in h]
    return steps + [(h["eval_loss"],) for h in rows if "eval_loss" in h]


def dense_run(name: str, packed: bool, n: int, out: str) -> tuple[list, dict]:
    collator = DataCollatorWithFlattening() if packed else default_data_collator
    trained = model(name)
    trainer = Trainer(trained, TrainingArguments(out, **ARGS), collator, dataset(packed, n), dataset(packed, 8, 2))
    trainer.train()
    return logged(trainer), trained.state_dict()


def torchrun_env(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def _odysseus_run(rank, world, name, packed, n, out, options):
    from odysseus.integrations.hf import hf_state_dict
    from odysseus.integrations.trainer import OdysseusTrainer

    torchrun_env(rank, world)
    collator = DataCollatorWithFlattening() if packed else default_data_collator

    def trainer():
        args, data, held_out = TrainingArguments(out, **ARGS), dataset(packed, n), dataset(packed, 8, 2)
        return OdysseusTrainer(model(name), args, collator, data, held_out, **options)

    first = trainer()
    first.train()
    weights = hf_state_dict(first.model)
    resumed = trainer()  # a fresh model and optimizer, from the step-2 checkpoint
    resumed.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    return logged(first), weights, logged(resumed, after=2), hf_state_dict(resumed.model)


def check(got_logs, want_logs, got_weights, want_weights, what):
    assert len(got_logs) == len(want_logs), (what, got_logs, want_logs)
    for step, (got, want) in enumerate(zip(got_logs, want_logs), 1):
        assert_close(torch.tensor(got), torch.tensor(want), **TOL, what=f"{what}: entry {step} (loss, norm, lr)")
    assert set(got_weights) == set(want_weights), what
    for k, v in want_weights.items():
        assert_close(got_weights[k], v, **TOL, what=f"{what}: {k}")


CASES = {
    # world, model, packed, training examples, OdysseusTrainer options. 18 examples in batches of 4 leave a
    # short last batch (2 examples, one per replica), which is step 3 on its own.
    "llama-sp2-longseq": (2, "llama", False, 16, dict(checkpoint=True, ffn_tile=8, save_input="shard", loss_chunk=16)),
    "qwen2-2x2-packed-zero3": (4, "qwen2", True, 18, dict(sp_size=2, zero3=True)),
    # Pure ring attention (ring 2 x sp 1), packed documents straddling the ring's chunks.
    "llama-ring2-packed": (2, "llama", True, 16, dict(ring_size=2, strategy="ulysses")),
}


@pytest.mark.parametrize("case", CASES)
def test_trainer_matches_dense_trainer_numerics(case, tmp_path):
    world, name, packed, n, options = CASES[case]
    want_logs, want_weights = dense_run(name, packed, n, str(tmp_path / "dense"))
    out = tmp_path / "odysseus"
    logs, weights, resumed_logs, resumed_weights = run_ranks(
        world, _odysseus_run, name, packed, n, str(out), options, timeout=300
    )[0]
    check(logs, want_logs, weights, want_weights, f"{case}: run")
    # After step 2: steps 3 and 4, and the evaluation at step 4.
    check(resumed_logs, want_logs[2:4] + want_logs[5:], resumed_weights, want_weights, f"{case}: resumed at step 2")
    # The checkpoints hold the dense model: from_pretrained loads it on one device, as the dense run saved it.
    cls = type(model(name))
    for step in (2, 4):
        ours = cls.from_pretrained(out / f"checkpoint-{step}").state_dict()
        dense = cls.from_pretrained(tmp_path / "dense" / f"checkpoint-{step}").state_dict()
        check([], [], ours, dense, f"{case}: checkpoint-{step}")


def _misuse(rank, world, out):
    from odysseus.integrations.trainer import OdysseusTrainer

    torchrun_env(rank, world)

    def attempt(make=lambda: model("llama"), collator=default_data_collator, **changes):
        no_saves = {"save_strategy": "no", "eval_strategy": "no", "max_steps": 1}
        args = TrainingArguments(out, **{**ARGS, **no_saves, **changes.pop("args", {})})
        if "deepspeed" in changes:  # deepspeed is not installed, and TrainingArguments checks that it is
            args.deepspeed = changes.pop("deepspeed")
        try:
            trainer = OdysseusTrainer(make(), args, train_dataset=dataset(False), data_collator=collator, **changes)
            trainer.train()
        except (ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def padded(features):  # the second half of every row is padding
        batch = default_data_collator(features)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][:, 15:] = 0
        return batch

    gpt2 = lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128))  # noqa: E731
    return {
        "model type": attempt(make=gpt2),
        "deepspeed": attempt(deepspeed={"zero_optimization": {"stage": 3}}),
        "fsdp": attempt(args={"fsdp": "full_shard"}),
        "batch": attempt(sp_size=1, args={"per_device_train_batch_size": 3}),
        "sp_size": attempt(sp_size=3),
        "ring_size": attempt(ring_size=3),
        "padding": attempt(collator=padded),
    }


def test_trainer_misuse_raises_on_every_rank(tmp_path):
    want = {
        "model type": "GPT2LMHeadModel holds no transformers decoder layer",
        "deepspeed": "TrainingArguments(deepspeed=",
        "fsdp": "TrainingArguments(fsdp=",
        "batch": "per_device_train_batch_size=3 sequences per step cannot be split over the 2 data-parallel",
        "sp_size": "sp_size=3 with ring_size=1; expected ring_size * sp_size to divide the world size 2",
        "ring_size": "ring_size=3; expected a divisor of the world size 2",
        "padding": "attention_mask holds 56 padding tokens",
    }
    for rank, got in enumerate(run_ranks(2, _misuse, str(tmp_path), timeout=200)):
        for case, message in want.items():
            assert got[case] is not None and message in got[case], (rank, case, got[case])


def test_example_under_torchrun_matches_the_dense_script_numerics(tmp_path):
    # examples/trainer_sft.py as a user runs it: --dense in one process, then OdysseusTrainer under torchrun at
    # world 2 (accelerate starts the gloo group), with packing, accumulation, recomputation and the chunked loss.
    import importlib.util
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "examples", "trainer_sft.py")
    spec = importlib.util.spec_from_file_location("trainer_sft", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    flags = ["--steps", "3", "--examples", "24", "--batch", "4", "--accumulate", "2", "--save-every", "3"]
    dense = example.main(["--dense", *flags, "--out", str(tmp_path / "dense")])

    metrics = tmp_path / "metrics.json"
    flags += ["--checkpoint", "--loss-chunk", "16", "--out", str(tmp_path / "odysseus"), "--metrics", str(metrics)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a shared machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *flags]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    got = [(h["loss"], h["grad_norm"]) for h in json.loads(metrics.read_text())]
    want = [(h["loss"], h["grad_norm"]) for h in dense]
    assert len(got) == len(want) == 3
    assert_close(torch.tensor(got), torch.tensor(want), **TOL, what="example: (loss, grad norm) per step")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "odysseus" / "checkpoint-3").state_dict()
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "dense" / "checkpoint-3").state_dict()
    check([], [], ours, theirs, "example: checkpoint-3")


def test_resume_refuses_a_dense_optimizer_and_another_layout(tmp_path):
    from odysseus.integrations.trainer_state import load_optimizer, save_layout, save_optimizer

    layout = {"strategy": "odysseus", "world": 4, "dp": 2}
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert not load_optimizer(opt, str(tmp_path), 0, layout), "weights only (save_only_model): nothing to load"
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match="dense Trainer's optimizer.pt"):
        load_optimizer(opt, str(tmp_path), 0, layout)
    ours = tmp_path / "ours"
    save_optimizer(opt, str(ours), 1)
    save_layout(str(ours), layout)
    with pytest.raises(ValueError, match="layout .* this run is .*'world': 2"):
        load_optimizer(opt, str(ours), 1, {**layout, "world": 2, "dp": 1})
    fresh = torch.optim.AdamW(layer.parameters())
    assert load_optimizer(fresh, str(ours), 1, layout)
    assert_close(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"], 0, 0, "exp_avg")


def _sft_tokenizer():
    """A word-level tokenizer over the model's 128 ids, made here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(126)} | {"<pad>": 126, "<eos>": 127}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")


def _sft_run(rank, world, out, odysseus):
    """TRL's SFTTrainer, or OdysseusSFTTrainer at sp = world: text examples that TRL tokenizes and packs (its
    padding-free collator), SFTConfig's default gradient checkpointing, accumulation, clipping, its schedule."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if odysseus:
        torchrun_env(rank, world)  # before SFTConfig: accelerate reads the layout when the arguments are made
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(0, 126, (int(n),), generator=g)) for n in range(4, 36)]
    config = SFTConfig(
        out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
        max_grad_norm=0.5, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        disable_tqdm=True, packing=True, max_length=48,
    )  # fmt: skip
    assert config.gradient_checkpointing  # TRL's default, which OdysseusSFTTrainer turns into checkpoint=True
    parts = dict(model=model("llama"), args=config, train_dataset=Dataset.from_list([{"text": t} for t in texts]))
    parts["processing_class"] = _sft_tokenizer()
    if odysseus:
        from odysseus.integrations.sft import OdysseusSFTTrainer

        trainer = OdysseusSFTTrainer(**parts, sp_size=world)
    else:
        trainer = SFTTrainer(**parts)
    trainer.train()
    return [(h["loss"], h["grad_norm"], h["learning_rate"]) for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_matches_trl_numerics(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # TRL reports usage from rank 0 otherwise
    want = _sft_run(0, 1, str(tmp_path / "dense"), odysseus=False)
    got = run_ranks(2, _sft_run, str(tmp_path / "odysseus"), True, timeout=300)[0]
    check(got, want, {}, {}, "OdysseusSFTTrainer against SFTTrainer")
