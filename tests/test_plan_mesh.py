"""The planner on a 2-D mesh: the data-parallel closed forms written out by hand, intra- against inter-node
bandwidth, tokens/s per GPU of the whole job, and the command line's --sp/--dp (with --gpus as shorthand)."""

import dataclasses

import pytest

from odysseus import TransformerConfig, plan
from odysseus.plan import Case
from odysseus.plan import __main__ as cli
from odysseus.plan.data_parallel import dp_collectives, dp_grad_numel


def test_dp_grad_numel_by_hand():
    """Even shapes: 4 heads (width 2) of 2 kv heads, FFN 16, hidden 8, over sp = 2: each rank holds 2 query
    heads and 1 kv head. Written out independently of odysseus.plan.forms."""
    cfg = TransformerConfig(hidden_size=8, num_heads=4, num_kv_heads=2, intermediate_size=16)
    d, hd, i = 8, 2, 16
    heads = (2 * 2 + 2 * 1) * hd * d  # q and o: 2 heads; k and v: 1 kv head
    want = {
        ("tp", None): heads + 3 * (i // 2) * d + 2 * d,
        ("odysseus", None): heads + 3 * i * d + 2 * d,  # whole FFN
        ("ulysses", None): (2 * 4 + 2 * 2) * hd * d + 3 * i * d + 2 * d,  # whole weights
        ("odysseus", "hybrid"): heads,  # FSDP2 reduces the FFN and norms over dp itself
        ("odysseus", "full"): heads,
        ("odysseus", "sp"): heads + 3 * i * d // 2 + 2 * d // 2,  # each sharded weight's half over sp
        ("ulysses", "hybrid"): 0,
    }
    for (strategy, shard), numel in want.items():
        variant = strategy + ("+zero3" if shard else "")
        assert dp_grad_numel(Case(variant, cfg, 1, 16, 2, 0, 2), shard) == numel, (strategy, shard)
    # One all-reduce over dp: a reduce-scatter and an all-gather of (dp-1)/dp of the elements each.
    (ar,) = dp_collectives(Case("tp", cfg, 1, 16, 2, 0, 2), 4, 1, None)
    assert (ar.op, ar.label, ar.bytes_received) == ("all_reduce", "dp grads", 2 * 3 * want[("tp", None)] // 4 * 2)
    assert dp_collectives(Case("ulysses+zero3", cfg, 1, 16, 2, 0, 2), 4, 1, "hybrid") == []
    with pytest.raises(ValueError, match="shard='dp'"):
        dp_grad_numel(Case("tp", cfg, 1, 16, 2, 0, 2), "dp")


def _by(preds):
    return {p.strategy: p for p in preds}


def test_dp_gradient_traffic_crosses_nodes_at_the_nic_bandwidth():
    """tp-sp on sp = 4: 2 replicas fit one node (NVLink), 4 replicas span two (the NIC). The extra link time
    over dp = 1 is the gradient all-reduce's bytes over that bandwidth (link efficiency 0.8) plus its latency."""
    hw, a = plan.get_hardware("h100-nvlink"), plan.Assumptions()
    model = plan.get_model("llama2-7b")
    base = _by(plan.predict(model, 8192, 4, hw, dp=1))["tp-sp"]
    # Elements per rank: 32 layers of this rank's share (no ZeRO-3), and the embedding + LM head split by
    # vocabulary (the strategy holds no whole weights) with the final norm.
    case = Case("tp-sp", model.config(), 1, 8192, 4, 0, 2)
    numel = 32 * dp_grad_numel(case, None) + 2 * (32000 // 4) * 4096 + 4096
    for dp, bandwidth in ((2, hw.intra_node_bw), (4, hw.inter_node_bw)):
        got = _by(plan.predict(model, 8192, 4, hw, dp=dp))["tp-sp"]
        nbytes = 2 * (dp - 1) * numel // dp * 2  # bf16; numel divides evenly here
        want = nbytes / (bandwidth * a.link_efficiency) + 2 * a.collective_latency_s
        assert got.cost.link_s - base.cost.link_s == pytest.approx(want, rel=1e-9), dp
        assert got.cost.comm_bytes - base.cost.comm_bytes == pytest.approx(nbytes, rel=1e-12)
        # Per-GPU memory does not depend on the replicas (ZeRO-3 is planned as hybrid sharding).
        assert got.memory == base.memory


def test_tokens_per_second_per_gpu_and_ranking_across_nodes():
    preds = plan.predict("llama3-8b", 65536, 8, "h100-nvlink", dp=4)
    for p in preds:
        if p.feasible:
            assert p.tokens_per_s_per_gpu == pytest.approx(65536 / (p.step_s * 8))
    ranked = [p for p in preds if p.rank]
    assert ranked and [p.rank for p in ranked] == list(range(1, len(ranked) + 1))
    # More replicas only add gradient traffic: no strategy gets faster per GPU.
    two = _by(plan.predict("llama3-8b", 65536, 8, "h100-nvlink", dp=2))
    for p in preds:
        if p.feasible:
            assert p.step_s >= two[p.strategy].step_s, p.strategy
    # Hardware without an inter-node link holds one node: 2 x 8 does not fit it.
    single = dataclasses.replace(plan.get_hardware("h100-nvlink"), inter_node_bw=None)
    assert all(not p.feasible and "N=16" in p.note for p in plan.predict("llama3-8b", 65536, 8, single, dp=2))


def test_cli_sp_dp_and_gpus_shorthand(capsys):
    cli.main(["--model", "llama3-8b", "--seq", "65536", "--sp", "8", "--dp", "2", "--hardware", "h100-nvlink"])
    out = capsys.readouterr().out
    assert "over 2 replicas x 8 x h100-nvlink" in out and "| tok/s/GPU |" in out
    assert "tokens/s on 16 GPUs (predicted, not measured)" in out
    cli.main(["--model", "llama3-8b", "--seq", "65536", "--gpus", "8"])
    shorthand = capsys.readouterr().out
    cli.main(["--model", "llama3-8b", "--seq", "65536", "--sp", "8", "--dp", "1"])
    assert capsys.readouterr().out == shorthand
    with pytest.raises(SystemExit):
        cli.main(["--model", "llama3-8b", "--seq", "65536", "--sp", "8", "--gpus", "8"])
    assert "give one of --gpus and --sp" in capsys.readouterr().err
