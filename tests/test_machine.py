"""bench.machine: the CPU heap policy and the peak resident memory of a step."""

from __future__ import annotations

import os

import pytest
import torch

from bench.machine import PeakRss, device_name, heap_for_measuring, malloc_policy, set_malloc_policy


@pytest.fixture
def restore_heap_policy():
    previous = malloc_policy()
    yield
    set_malloc_policy(previous)


def test_peak_rss_counts_a_temporary_that_lives_for_microseconds(restore_heap_policy):
    """The CPU memory step reads the kernel's high-water mark where it can: exact, however short the peak."""
    set_malloc_policy("measure")  # large blocks mmap'd: freeing one really lowers the RSS again
    with PeakRss() as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert rss.peak - rss.start_rss >= 60 * 2**20, (rss.peak - rss.start_rss) / 2**20
    assert rss.exact == os.access("/proc/self/clear_refs", os.W_OK)


@pytest.mark.parametrize("timing_policy", ["retain", "system"])
def test_the_memory_step_measures_under_mmap_and_hands_the_timing_policy_back(restore_heap_policy, timing_policy):
    assert set_malloc_policy(timing_policy)
    with heap_for_measuring():
        assert malloc_policy() == ("measure" if timing_policy == "retain" else timing_policy)
    assert malloc_policy() == timing_policy


def test_the_policy_is_handed_back_when_the_step_fails(restore_heap_policy):
    assert set_malloc_policy("retain")
    with pytest.raises(RuntimeError, match="step failed"), heap_for_measuring():
        raise RuntimeError("step failed")
    assert malloc_policy() == "retain"


def test_the_cpu_is_named_with_its_core_count():
    assert device_name("cpu").endswith(f"({os.cpu_count()} cores)")
