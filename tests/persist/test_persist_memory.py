"""Host memory stays flat over many saves (user report: RSS grows every save)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="measures glibc's heap",
)

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import torch, aiostage

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) // 1024

    async def main(path):
        # 32 MiB in 200 tensors; every 5 saves 20 tensors are replaced by new
        # ones (new storages, so new staging buffers), as a training run's
        # optimizer or a re-created buffer would.
        state = {f"t{i}": torch.randn(32 * 2**20 // 200 // 4) for i in range(200)}
        keys = list(state)
        rss = []
        async with aiostage.DefaultStager() as stager:
            for step in range(30):
                if step and step % 5 == 0:
                    for k in keys[(step // 5) * 20 % 200 :][:20]:
                        state[k] = torch.full_like(state[k], float(step))
                await (await stager.save(state, path)).wait()
                rss.append(rss_mib())
        print("RSS", rss[4], rss[-1])

    asyncio.run(main(sys.argv[1]))
    """
)


@glibc
def test_rss_flat_over_saves_that_replace_tensors(tmp_path: Path) -> None:
    """After warm-up, 25 more saves add at most 4 MiB of RSS (without giving
    freed heap memory back it grew by 9 MiB here, and without bound)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "ckpt.pt")],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RSS "))
    warm, last = (int(v) for v in line.split()[1:])
    assert last - warm <= 4, f"RSS grew from {warm} to {last} MiB over 25 saves"
