"""Fixtures for the server tests (helpers and the tiny model live in serve_helpers.py)."""

import pytest
from serve_helpers import save_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-gemma4")


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    from gemma4.serve import load_checkpoint

    return load_checkpoint(str(tiny_dir))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The tiny model on one intra-op thread leaves the other core to the server's event loop."""
