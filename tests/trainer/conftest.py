"""Trainer tests run torch in this process: keep them quick and predictable on a busy 2-core machine."""

import os

import pytest

# Sleeping (not spinning) OpenMP threads: spinning ones made in-process training up to 30x slower when other
# processes competed for the cores. Only effective if torch is not loaded yet (e.g. `pytest tests/trainer`);
# subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """Run the test's torch work on one thread (no OpenMP parallel regions to stall), then restore."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
