"""StageActor helpers that need no Ray."""

from __future__ import annotations

import os
import time

import torch

from distlayer.stage import release_openmp_threads


def test_idle_openmp_threads_are_ended_and_come_back_when_needed():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(512, 512)
        want = a @ a
        threads = len(os.listdir("/proc/self/task"))
        release_openmp_threads()
        deadline = time.monotonic() + 5
        while len(os.listdir("/proc/self/task")) >= threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(os.listdir("/proc/self/task")) < threads  # the pool's worker is gone
        torch.testing.assert_close(a @ a, want)  # and a new pool computes the same
        assert len(os.listdir("/proc/self/task")) == threads
    finally:
        torch.set_num_threads(before)
