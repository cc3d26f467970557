"""The event loop stays responsive while 512 MiB are persisted and loaded."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import torch

import aiostage

MiB = 1024 * 1024
T = TypeVar("T")


async def run_with_ticker(op: Awaitable[T]) -> tuple[T, float, float]:
    """Await ``op`` while a 1 ms ticker runs; return (result, seconds, max tick gap)."""
    gaps: list[float] = []

    async def ticker(stop: anyio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker, stop)
        start = time.perf_counter()
        result = await op
        elapsed = time.perf_counter() - start
        stop.set()
    assert len(gaps) > 10  # the ticker did run during the operation
    return result, elapsed, max(gaps)


@pytest.mark.slow
async def test_loop_stays_responsive_during_512_mib_persist_and_load(tmp_path: Path) -> None:
    parts = 64
    per = 512 * MiB // 4 // parts
    state = {f"w{i}": torch.empty(per).fill_(float(i)) for i in range(parts)}
    target = tmp_path / "big.pt"

    path, elapsed, gap = await run_with_ticker(aiostage.persist(state, target))
    assert gap < 0.25 and gap < elapsed / 4, (gap, elapsed)

    loaded: Any
    loaded, elapsed, gap = await run_with_ticker(aiostage.load(path))
    assert gap < 0.25 and gap < elapsed / 4, (gap, elapsed)
    assert torch.equal(loaded["w63"], state["w63"])
    del loaded

    loaded, elapsed, gap = await run_with_ticker(aiostage.load(path, verify=True))
    assert gap < 0.25 and gap < elapsed / 4, (gap, elapsed)
    assert torch.equal(loaded["w7"], state["w7"])
