"""Fixtures for tests/train (helpers to import live in train_helpers.py, never here)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine, tiny matmuls (and the real 270M's) ran
    several times slower with two, from OpenMP contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
