"""A real full disk: a small tmpfs mounted for the test (needs root; skipped
otherwise).  ENOSPC must leave the previous checkpoint and no temp file,
through the page cache and through O_DIRECT alike."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import aiostage
from aiostage import PersistError
from aiostage._persist import _atomic, _writer
from aiostage._persist._writer import persist

MiB = 1024 * 1024


def _mount_small_tmpfs(where: Path, size_mib: int) -> bool:
    if os.geteuid() != 0:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    if not _mount_small_tmpfs(where, 8):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.parametrize("direct_io", [True, False])
async def test_full_disk_gives_enospc_and_keeps_previous(small_disk: Path, direct_io: bool) -> None:
    target = small_disk / "ckpt.pt"
    previous = {"w": torch.arange(MiB // 4, dtype=torch.float32)}  # 1 MiB
    await persist(previous, target, direct_io=direct_io)
    too_big = {f"w{i}": torch.full((MiB,), float(i)) for i in range(4)}  # 16 MiB
    with pytest.raises(PersistError) as info:
        await persist(too_big, target, direct_io=direct_io)
    exc = info.value
    assert exc.errno == errno.ENOSPC
    assert "ENOSPC" in str(exc) and str(target) in str(exc)
    assert isinstance(exc.__cause__, OSError)
    assert os.listdir(small_disk) == ["ckpt.pt"]  # no temp file left
    loaded = await aiostage.load(target)
    assert torch.equal(loaded["w"], previous["w"])
    # The space is free again: a checkpoint that fits is written.
    await persist({"w": too_big["w1"][: MiB // 2]}, target, direct_io=direct_io)
    assert torch.equal((await aiostage.load(target))["w"], too_big["w1"][: MiB // 2])


async def test_full_disk_mid_run_of_small_records(small_disk: Path) -> None:
    """Small records go out a run at a time, with their headers (see
    INLINE_MAX_BYTES): ENOSPC in such a write is handled the same way."""
    target = small_disk / "ckpt.pt"
    previous = {"w": torch.arange(1000.0)}
    await persist(previous, target)
    many = {f"t{i}": torch.full((1024,), float(i)) for i in range(3000)}  # 12 MiB of 4 KiB
    with pytest.raises(PersistError) as info:
        await persist(many, target)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(small_disk) == ["ckpt.pt"]
    assert torch.equal((await aiostage.load(target, verify=True))["w"], previous["w"])


def used_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


async def test_replaced_checkpoint_is_freed_after_return_and_before_the_next_write(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old file's blocks are freed on a background thread after the
    rename, and the next persist waits for that: on a disk with room for two
    checkpoints, a third never has to fit."""
    monkeypatch.setattr(_atomic, "HOLD_MIN_BYTES", 0)
    gate = threading.Event()
    real_close = _writer._close_quietly
    real_wait = _writer._wait_releases

    def gated_close(fd: int) -> None:
        gate.wait()
        real_close(fd)

    def wait_opening_the_gate() -> None:
        gate.set()  # only the next write's wait lets the old file go
        real_wait()

    monkeypatch.setattr(_writer, "_close_quietly", gated_close)
    target = small_disk / "ckpt.pt"
    three_mib = MiB * 3 // 4
    await persist({"a": torch.full((three_mib,), 1.0)}, target)
    before = used_bytes(small_disk)
    await persist({"b": torch.full((three_mib,), 2.0)}, target)
    # The replaced file still holds its blocks: freeing it is deferred.
    assert used_bytes(small_disk) >= before + 3 * MiB
    monkeypatch.setattr(_writer, "_wait_releases", wait_opening_the_gate)
    # A third 3 MiB file fits only once the first is freed (8 MiB disk).
    await persist({"c": torch.full((three_mib,), 3.0)}, target)
    assert torch.equal((await aiostage.load(target))["c"], torch.full((three_mib,), 3.0))
    real_wait()
    assert used_bytes(small_disk) < before + 2 * MiB
    assert os.listdir(small_disk) == ["ckpt.pt"]
