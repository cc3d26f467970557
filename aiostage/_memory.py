"""Give the C allocator's free memory back to the OS after a checkpoint.

A save allocates and frees many medium-sized blocks outside the staging
buffers (the pickle, write batches, torch's temporaries).  glibc keeps freed
heap memory for reuse, and after large frees it raises its own mmap
threshold, so more blocks come from heaps it does not shrink.  In a run that
replaces tensors between saves (new storages, so new staging buffers), the
process's RSS then crept up by about 2 MiB per save on the benchmark's
128 MiB state, without bound (``benchmarks/profile_aiostage.py --only rss``),
while the live memory stayed flat.  ``malloc_trim(0)`` after each save
returns the free pages; with it the same run stays flat (+1 MiB over 40
saves, like a run without aiostage).

Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Callable

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return free heap pages to the OS (blocking: a worker thread's job; the
    GIL is released meanwhile).  True if the allocator released any."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
