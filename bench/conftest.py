"""Shared by the pytest-benchmark files under bench/ (not part of the default test run)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every micro-benchmark on one torch thread: comparable figures on a machine whose other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
