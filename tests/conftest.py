"""Shared test setup: every test model is tiny, so torch runs on one thread.

Tiny tensors are too small for threads to pay, and on a busy 2-core machine two OpenMP threads per
process were measured 80-100x slower than one.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
