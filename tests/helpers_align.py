"""Shared bits of the alignment tests (tests/test_align_*.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run alignment tests on one intra-op thread: their tensors are tiny, and on a loaded 2-core machine
    two OpenMP threads spinning at barriers made them ~10x slower (measured: 152 s vs 12 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
