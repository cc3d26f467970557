"""A real full disk: a small tmpfs mounted for the test (needs root; skipped
otherwise).  ENOSPC must leave the previous checkpoint and no temp file,
through the page cache and through O_DIRECT alike."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import aiostage
from aiostage import PersistError
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
