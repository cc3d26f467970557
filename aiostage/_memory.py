"""Memory for large buffers, and giving the C allocator's free memory back.

:func:`mapped_storage`: staging buffers of :data:`MMAP_MIN_BYTES` or more
(and the bounce buffers of direct reads) get an anonymous mapping of their
own.  It goes back to the OS when the storage dies (from malloc, a freed
large block can stay in glibc's heap: its mmap threshold rises after large
frees, and host RSS crept up save after save in runs that replace
tensors), and it starts on a page boundary.

:func:`release_free_memory`: give the C allocator's free memory back to the
OS after a checkpoint.

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
import mmap
import platform
from collections.abc import Callable

import torch

__all__ = ["MMAP_MIN_BYTES", "mapped_storage", "release_free_memory"]

MMAP_MIN_BYTES = 128 * 1024
"""Buffers at least this large get an anonymous mapping of their own."""


def mapped_storage(nbytes: int) -> torch.UntypedStorage:
    """A CPU storage of ``nbytes`` (more than 0) on a private anonymous
    mapping of its own, page-aligned and untouched (pages fault in on first
    write).  Unmapped when the storage dies.  Unlike malloc'd storages it
    cannot be resized.

    Private, not Python's default ``MAP_SHARED``: a shared anonymous mapping
    is shmem, whose pages fault in through the shmem page cache.  Faulting
    in and filling 1 GiB of 5 MiB mappings from a worker thread took
    0.38-0.43 s shared against 0.27-0.30 s private on the development VM
    (6 rounds each, one run).  Transparent huge pages (``MADV_HUGEPAGE``)
    were measured too, and not adopted: 0.16-1.53 s in the same run.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=torch.uint8).untyped_storage()


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
