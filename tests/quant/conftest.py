import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every quant test runs with one intra-op thread (the shared `one_thread` of tests/conftest.py):
    on a busy 2-core machine every parallel op otherwise waits for the other core."""
