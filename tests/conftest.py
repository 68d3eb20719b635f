"""Shared fixtures: tiny random reference (transformers) models saved as real checkpoints."""

from __future__ import annotations

import pytest
import torch
from testing_utils import hf_model, save_hf


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: (variant name) -> (transformers model, checkpoint dir)."""

    def make(name: str, **kwargs):
        model = hf_model(name)
        return model, save_hf(model, tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def gemma3_270m():
    """The real gemma-3-270m (embedded GGUF, dequantized to float32): (model, tokenizer), loaded once."""
    import gemma4

    return gemma4.load()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: one intra-op thread is faster, is immune to a busy machine,
    and leaves the other core to a server's or scheduler's threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
