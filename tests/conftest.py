"""Shared test settings.

PLANREC_TEST_THREADS=N runs every test with N torch threads (the suite is checked with 1 and 2:
a test of learning must not hinge on one float trajectory). Unset, the files of tiny tensors pin
one thread (extra threads only cost time on a busy 2-core machine) and the rest keep torch's
default.
"""

import os
from pathlib import Path

import pytest
import torch

from datasets import ml1m

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


# The shared MovieLens-1M beside the checkout (../shared/data/ml-1m; CI has it too). Tests never
# download: the few that read the real data skip where no copy is there.
SHARED_ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"


@pytest.fixture
def shared_ml1m():
    """The folder of the shared ML-1M copy, or skip the test where there is none."""
    if not ml1m.contains_ml1m(SHARED_ML1M):
        pytest.skip(f"no ML-1M copy at {SHARED_ML1M}")
    return SHARED_ML1M
