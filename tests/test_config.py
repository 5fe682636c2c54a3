import pytest
import torch

from odysseus import TransformerConfig
from odysseus.reference import Attention, TransformerBlock


def test_defaults():
    c = TransformerConfig(hidden_size=96, num_heads=6, intermediate_size=160)
    assert c.num_kv_heads == 6 and c.head_dim == 16 and c.q_per_kv == 1 and c.causal


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (
            dict(hidden_size=96, num_heads=6, num_kv_heads=4, intermediate_size=8),
            "num_heads=6 is not divisible by num_kv_heads=4",
        ),
        (dict(hidden_size=0, num_heads=6, intermediate_size=8), "hidden_size=0"),
        (dict(hidden_size=96, num_heads=-1, intermediate_size=8), "num_heads=-1"),
        (dict(hidden_size=96, num_heads=6, intermediate_size=0), "intermediate_size=0"),
        (dict(hidden_size=96, num_heads=6, num_kv_heads=0, intermediate_size=8), "num_kv_heads=0"),
        (dict(hidden_size=100, num_heads=6, intermediate_size=8), "hidden_size=100 is not divisible by num_heads=6"),
        (dict(hidden_size=96, num_heads=6, head_dim=15, intermediate_size=8), "head_dim=15 must be even"),
        (dict(hidden_size=96.0, num_heads=6, intermediate_size=8), "hidden_size=96.0"),
    ],
)
def test_invalid_config_names_the_value(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        TransformerConfig(**kwargs)


def test_reference_rejects_bad_input():
    c = TransformerConfig(hidden_size=96, num_heads=6, num_kv_heads=2, intermediate_size=160)
    block = TransformerBlock(c)
    with pytest.raises(ValueError, match=r"expected x of shape \(batch, seq, hidden\), got 2 dims"):
        block(torch.zeros(5, 96))
    with pytest.raises(ValueError, match="expected hidden size 96, got x.shape\\[-1\\]=64"):
        block(torch.zeros(1, 5, 64))
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match weight dtype torch.float32"):
        block(torch.zeros(1, 5, 96, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"position_ids of shape \(1, 4\) do not match the input: expected \(5,\)"):
        Attention(c)(torch.zeros(1, 5, 96), torch.arange(4)[None])
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        Attention(c)(torch.zeros(1, 5, 96), torch.zeros(5))
