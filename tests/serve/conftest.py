"""Fixtures for the server tests (helpers and the tiny model live in serve_helpers.py)."""

import pytest
import torch

from serve_helpers import save_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-gemma4")


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    from gemma4.serve import load_checkpoint

    return load_checkpoint(str(tiny_dir))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny model is fastest on one intra-op thread, and the scheduler thread then leaves the
    # other core to the server's event loop and the test's clients.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
