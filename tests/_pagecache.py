"""Test helpers: whether direct I/O works in a directory, whether the kernel
can say what the page cache holds, and how much of a file it holds."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile
from pathlib import Path

import pytest

from aiostage._load import _records

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def direct_io_works(directory: Path) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    # A directory of its own: a fixed name could meet another run's file.
    with tempfile.TemporaryDirectory(dir=directory, prefix="aiostage-direct-probe-") as scratch:
        try:
            fd = os.open(Path(scratch) / "probe", os.O_WRONLY | os.O_CREAT | flag, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        os.close(fd)
    return True


needs_direct = pytest.mark.skipif(
    not direct_io_works(Path(os.environ.get("TMPDIR", "/tmp"))),
    reason="the temp file system refuses O_DIRECT",
)


def needs_cachestat(path: Path) -> None:
    """Skip the test where the kernel cannot say what of ``path`` the page
    cache holds (``cachestat``, Linux 6.5+), as aiostage asks it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _records.page_cache_state(fd, 0, 0) is None:
            pytest.skip("no cachestat (Linux < 6.5): the page cache cannot be asked")
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages that are in the page cache (``mincore``)."""
    size = path.stat().st_size
    pages = (size + PAGE - 1) // PAGE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        view = (ctypes.c_char * size).from_buffer(m)
        try:
            vec = (ctypes.c_ubyte * pages)()
            rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec)
            assert rc == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec) / pages
        finally:
            del view


def evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (after an fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_through_cache(path: Path) -> None:
    """Bring all of ``path`` into the page cache."""
    with open(path, "rb") as f:
        while f.read(16 * 1024 * 1024):
            pass
