"""aiostage._threads: threads and cleanup are never abandoned, and waiting is cheap."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import anyio
import pytest
from _ticker import LoopTicker

from aiostage._threads import GilTurns, run_sync, uncancelled


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


def _busy(seconds: float, turn: GilTurns | None) -> int:
    """Pure-Python work that holds the GIL (as an unpickler does)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += sum(i * i for i in range(200))
        if turn is not None:
            turn()
    return n


@pytest.mark.parametrize("turns", [True, False])
async def test_gil_turns_let_the_loop_run_beside_pure_python_work(turns: bool) -> None:
    """CPython makes a thread that wants the GIL wait a switch interval
    (5 ms); with GilTurns the worker hands it over every millisecond, so
    the loop's median wake-up gap stays near its 1 ms sleep."""
    async with LoopTicker() as ticker:
        await run_sync(_busy, 0.3, GilTurns() if turns else None)
    median = ticker.percentile(0.5)
    if turns:
        assert median < 0.004, median
    else:  # the control: without turns the loop waits out the switch interval
        assert median >= 0.9 * sys.getswitchinterval(), median
