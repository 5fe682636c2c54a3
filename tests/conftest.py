import os
import sys

import pytest
import torch
import torch._dynamo  # noqa: F401  # imported once here, not in every forked rank: custom ops load it lazily (~2 s)

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_setup(item):
    # Tests marked gpu run where CUDA is; elsewhere they are skipped (and reported as skipped, never passed).
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
