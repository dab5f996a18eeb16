"""Shared test settings.

PLANREC_TEST_THREADS=N runs every test with N torch threads (the suite is checked with 1 and 2:
a test of learning must not hinge on one float trajectory). Unset, the files of tiny tensors pin
one thread (extra threads only cost time on a busy 2-core machine) and the rest keep torch's
default.
"""

import os

import pytest
import torch

TEST_THREADS = int(os.environ["PLANREC_TEST_THREADS"]) if os.environ.get("PLANREC_TEST_THREADS") else None


def pytest_configure(config):
    if TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="module")
def few_threads():
    """One thread for a module of tiny tensors, or PLANREC_TEST_THREADS when it is set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS or 1)
    yield
    torch.set_num_threads(threads)
