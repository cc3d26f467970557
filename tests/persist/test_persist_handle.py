"""SaveHandle: wait, done, cancel and the exactly-once on_finish hook."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import anyio
import pytest
import torch

import aiostage
from aiostage import PersistError, SaveHandle
from aiostage._persist._writer import persist

MiB = 1024 * 1024


def temps(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".aiostage-tmp." in n]


async def test_wait_returns_path_and_on_finish_runs_once(tmp_path: Path) -> None:
    finished: list[bool] = []
    state = {"w": torch.randn(1000)}
    task = asyncio.create_task(aiostage.persist(state, tmp_path / "c.pt"))
    handle = SaveHandle(task, staged=state, on_finish=lambda: finished.append(True))
    assert handle.staged is state
    assert await handle.wait() == tmp_path / "c.pt"
    assert await handle == tmp_path / "c.pt"
    assert handle.done() and not handle.cancelled()
    # on_finish was registered before any waiter, so it has run by now.
    assert finished == [True]
    assert torch.equal((await aiostage.load(tmp_path / "c.pt"))["w"], state["w"])


async def test_error_reaches_wait_and_on_finish_runs(tmp_path: Path) -> None:
    finished: list[bool] = []
    task = asyncio.create_task(aiostage.persist({"a": torch.ones(1)}, tmp_path / "no" / "c.pt"))
    handle = SaveHandle(task, on_finish=lambda: finished.append(True))
    with pytest.raises(PersistError):
        await handle.wait()
    with pytest.raises(PersistError):  # every waiter sees it
        await handle.wait()
    assert finished == [True]


async def test_cancel_removes_temp_and_runs_on_finish(tmp_path: Path) -> None:
    target = tmp_path / "c.pt"
    await aiostage.persist({"old": torch.ones(2)}, target)
    first_chunk = anyio.Event()
    finish_event = anyio.Event()
    finished: list[bool] = []

    def on_finish() -> None:
        finished.append(True)
        finish_event.set()

    def progress(done: int, total: int) -> None:
        if done > 0 and len(temps(tmp_path)) == 1:
            first_chunk.set()

    state = {f"w{i}": torch.zeros(8 * MiB) for i in range(4)}
    task = asyncio.create_task(persist(state, target, progress=progress, _chunk_bytes=4 * MiB))
    handle = SaveHandle(task, staged=state, on_finish=on_finish)
    await first_chunk.wait()
    assert not handle.done()
    assert handle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handle.wait()
    await finish_event.wait()
    assert finished == [True]
    assert handle.cancelled()
    assert not handle.cancel()  # already over
    assert temps(tmp_path) == []
    assert torch.equal((await aiostage.load(target))["old"], torch.ones(2))


async def test_cancelling_a_waiter_does_not_cancel_the_write(tmp_path: Path) -> None:
    gate = anyio.Event()

    async def wait_ready(storage: torch.UntypedStorage) -> None:
        await gate.wait()

    task = asyncio.create_task(
        persist({"w": torch.ones(10)}, tmp_path / "c.pt", wait_ready=wait_ready)
    )
    handle = SaveHandle(task)
    waiter = asyncio.create_task(handle.wait())
    await asyncio.sleep(0)  # one loop step: the waiter is now inside wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not handle.done()
    gate.set()
    assert await handle.wait() == tmp_path / "c.pt"


async def test_on_finish_error_goes_to_the_loop_handler(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    reported: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx.get("exception")))
    try:

        def on_finish() -> None:
            raise RuntimeError("release failed")

        task = asyncio.create_task(aiostage.persist({"a": torch.ones(1)}, tmp_path / "c.pt"))
        handle = SaveHandle(task, on_finish=on_finish)
        await handle.wait()
    finally:
        loop.set_exception_handler(None)
    assert len(reported) == 1 and isinstance(reported[0], RuntimeError)
