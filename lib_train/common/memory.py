"""Giving memory back: freed pages to the operating system after a job, VRAM while modules are not needed.

After a training the C allocator keeps the pages torch freed (glibc's malloc keeps them for reuse), so the
WebUI's resident memory stays at the run's peak. ``malloc_trim(0)`` returns them; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only; musl has no malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """True when the allocator was asked to give freed pages back (glibc on Linux)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@contextmanager
def parked_on_cpu(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """The modules wait in RAM for the block and come back to ``device`` after it, whatever happens: the same
    parameter objects (``Module.to`` swaps their data), so the model is bit-identical. On the CPU nothing moves."""
    if device.type == "cpu" or not modules:
        yield
        return
    for module in modules:
        module.to("cpu")
    try:
        yield
    finally:
        for module in modules:
            module.to(device)
