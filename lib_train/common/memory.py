"""Giving freed memory back to the operating system after a job.

After a training the C allocator keeps the pages torch freed (glibc's malloc keeps them for reuse), so the
WebUI's resident memory stays at the run's peak. ``malloc_trim(0)`` returns them; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


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
