"""examples/train_llama.py under torchrun at world 2 on CPU: the loss drops, the checkpoint loads in transformers."""

import importlib.util
import json
import os
import subprocess
import sys

import torch
from transformers import LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_llama.py")
SIZES = ["--seq", "256", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
SIZES += ["--intermediate", "128", "--vocab", "64", "--steps", "20", "--save-every", "10", "--log-every", "5"]


def _example():
    spec = importlib.util.spec_from_file_location("train_llama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_example_loss_drops_and_checkpoint_loads(tmp_path):
    # One launch covers the whole path: Odysseus with ZeRO-3 (FSDP2 shards the FFN and norms of every layer).
    metrics, out = tmp_path / "metrics.json", tmp_path / "ckpt"
    flags = ["--strategy", "odysseus", "--zero3", *SIZES, "--out", str(out), "--metrics", str(metrics)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT, *flags]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    got = json.loads(metrics.read_text())
    losses = got["loss"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, f"the loss did not drop: {losses}"
    sharded = got["zero3_sharded"]
    assert any(".mlp." in n for n in sharded) and any("layernorm" in n for n in sharded), sharded
    assert not any("self_attn" in n or "embed" in n for n in sharded), sharded
    assert sorted(os.listdir(out)) == ["step-10", "step-20"]

    # The last checkpoint is the trained model: on one device it scores a fresh batch like the last steps did.
    model = LlamaForCausalLM.from_pretrained(out / "step-20")
    example = _example()
    ids = example.Batches(example.parse_args(SIZES)).get(21)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert abs(loss - sum(losses[-5:]) / 5) < 0.5, (loss, losses)
