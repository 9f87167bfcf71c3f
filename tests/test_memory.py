"""Freed memory goes back to the operating system after a job (glibc's malloc_trim on Linux)."""

from __future__ import annotations

import sys

import pytest
import torch

from lib_train.common.memory import return_freed_memory


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc")
def test_freed_tensor_memory_is_returned():
    assert return_freed_memory()  # glibc: the trim is available
    before = resident_mb()
    # Many mid-sized blocks, as a training's activations are: below glibc's mmap threshold they land in the heap,
    # where free() alone keeps them.
    blocks = [torch.ones(64 * 1024) for _ in range(3000)]  # 256 KiB each, 750 MiB in all
    during = resident_mb()
    del blocks
    kept = resident_mb()
    return_freed_memory()
    after = resident_mb()
    assert during - before > 500
    assert after - before < 0.2 * (during - before), (before, during, kept, after)
