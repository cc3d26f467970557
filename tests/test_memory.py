"""aiostage._memory: staging buffers on mappings of their own."""

from __future__ import annotations

import gc
import os
import struct
import sys

import pytest
import torch

from aiostage._memory import MMAP_MIN_BYTES, mapped_storage

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/smaps and pagemap"
)
PAGE = os.sysconf("SC_PAGE_SIZE")


def _vma(address: int) -> tuple[str, list[str]]:
    """The permissions and VmFlags of the mapping holding ``address``
    (private anonymous mappings side by side may have merged into one)."""
    perms, inside = "", False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside, perms = lo <= address < hi, head[1]
            elif inside and head[0] == "VmFlags:":
                return perms, head[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _present_pages(address: int, nbytes: int) -> int:
    """How many pages of the range are in memory (/proc/self/pagemap, bit 63)."""
    first, count = address // PAGE, -(-nbytes // PAGE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        words = struct.unpack(f"<{count}Q", f.read(count * 8))
    return sum(w >> 63 for w in words)


def test_a_mapped_storage_is_private_page_aligned_untouched_and_unmapped_when_it_dies() -> None:
    nbytes = 4 * MMAP_MIN_BYTES + 123
    storage = mapped_storage(nbytes)
    address = storage.data_ptr()
    assert storage.nbytes() == nbytes and address % PAGE == 0
    perms, flags = _vma(address)
    # private ("p"), not shmem (no "sh" flag): see mapped_storage
    assert perms.endswith("p") and "sh" not in flags
    assert _present_pages(address, nbytes) == 0  # nothing faulted in yet
    torch.empty(0, dtype=torch.uint8).set_(storage).fill_(7)
    assert _present_pages(address, nbytes) == -(-nbytes // PAGE)
    del storage
    gc.collect()
    assert _present_pages(address, nbytes) == 0  # unmapped: the pages went back
