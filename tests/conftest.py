import os
import sys

import pytest
import torch
import torch._dynamo  # noqa: F401  # imported once here, not in every forked rank: custom ops load it lazily (~2 s)

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
