"""aiostage._threads: threads and cleanup are never abandoned, and waiting is cheap."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest

from aiostage._threads import run_sync, uncancelled


async def test_anyio_cancel_waits_for_the_thread_without_spinning() -> None:
    finished = threading.Event()

    def work() -> None:
        time.sleep(0.3)  # the work itself takes this long
        finished.set()

    cpu_before = time.thread_time()
    with anyio.CancelScope() as scope:
        asyncio.get_running_loop().call_later(0.01, scope.cancel)
        await run_sync(work)
    loop_cpu = time.thread_time() - cpu_before
    assert scope.cancelled_caught
    assert finished.is_set()
    # Waiting must not busy-loop on anyio's re-delivered cancellation.
    assert loop_cpu < 0.15


async def test_task_cancel_is_absorbed_until_done_then_reraised() -> None:
    release = threading.Event()
    finished = threading.Event()

    def work() -> str:
        release.wait()
        finished.set()
        return "done"

    task = asyncio.create_task(run_sync(work))
    await asyncio.sleep(0)
    task.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()
    task.cancel()  # again: still absorbed
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()


async def test_uncancelled_returns_the_result_when_not_cancelled() -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    assert await uncancelled(value()) == 7
