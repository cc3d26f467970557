"""aiostage._threads: threads and cleanup are never abandoned, and waiting is cheap."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from _ticker import LoopTicker

import aiostage
from aiostage import _threads
from aiostage._threads import (
    GilTurns,
    run_background,
    run_sync,
    run_sync_stoppable,
    uncancelled,
)


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


async def test_stoppable_step_returns_its_result_and_raises_its_error() -> None:
    def steps(stop: threading.Event, n: int) -> int:
        return n * 2 if not stop.is_set() else -1

    assert await run_sync_stoppable(steps, 21) == 42

    def fails(stop: threading.Event) -> None:
        raise OSError(5, "boom")

    with pytest.raises(OSError, match="boom"):
        await run_sync_stoppable(fails)


@pytest.mark.parametrize("how", ["task", "anyio"])
async def test_cancel_stops_a_stoppable_step_between_steps(how: str) -> None:
    """Cancelled, the step's stop event is set; the step in flight finishes
    (the thread is waited for), no further step starts, and the
    cancellation is raised."""
    started = asyncio.Event()
    release = threading.Event()
    loop = asyncio.get_running_loop()
    done: list[int] = []
    outcome: list[str] = []

    def steps(stop: threading.Event) -> None:
        for i in range(1000):
            if stop.is_set():
                outcome.append("stopped")
                return
            loop.call_soon_threadsafe(started.set)
            release.wait(timeout=30)
            done.append(i)
        outcome.append("ran to the end")

    if how == "task":
        task = asyncio.create_task(run_sync_stoppable(steps))
        await started.wait()
        task.cancel()
        loop.call_soon(release.set)  # the step in flight ends after the cancel
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with anyio.CancelScope() as scope:

            def cancel(_: object) -> None:
                scope.cancel()
                loop.call_soon(release.set)

            asyncio.ensure_future(started.wait()).add_done_callback(cancel)
            await run_sync_stoppable(steps)
        assert scope.cancelled_caught
    assert outcome == ["stopped"]  # the thread was waited for
    assert done == [0]  # only the step in flight when cancelled


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


def test_free_in_blocks_empties_the_list_in_place_with_turns_between_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Freeing tens of thousands of objects in one call holds the GIL for
    milliseconds: they are freed a block at a time, the GIL handed over
    between blocks."""
    monkeypatch.setattr(_threads, "FREE_BLOCK", 10)
    alive_at_turn: list[int] = []
    items: list[Any] = [object() for _ in range(95)]
    turn = GilTurns()
    monkeypatch.setattr(turn, "every", 0.0)
    monkeypatch.setattr(_threads.time, "sleep", lambda _: alive_at_turn.append(len(items)))
    _threads.free_in_blocks(items, turn)
    assert items == []
    assert alive_at_turn == [85, 75, 65, 55, 45, 35, 25, 15, 5, 0]


def test_free_all_in_blocks_empties_dicts_and_lists_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_threads, "FREE_BLOCK", 10)
    turns: list[int] = []
    monkeypatch.setattr(_threads.GilTurns, "__call__", lambda self: turns.append(1))
    d = {i: object() for i in range(25)}
    items: list[Any] = [object() for _ in range(25)]
    _threads.free_all_in_blocks(d, items)
    assert d == {} and items == []
    assert len(turns) == 6  # three blocks each


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
async def test_background_threads_run_at_lower_priority(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The checkpoint writer's threads are niced (default +10) and the
    caller's thread is not; the environment variable sets the increment."""
    from aiostage._persist import _writer

    seen: list[int] = []
    real = _writer._write_batch

    def spy(fd: int, temp: Any, batch: Any) -> None:
        seen.append(_own_niceness())
        real(fd, temp, batch)

    monkeypatch.setattr(_writer, "_write_batch", spy)
    base = _own_niceness()
    for env, want in (("", min(19, base + 10)), ("3", min(19, base + 3)), ("0", base)):
        monkeypatch.setenv(_threads.BACKGROUND_NICE_ENV, env)
        monkeypatch.setattr(_threads._background_pool, "pool", None)  # made with this setting
        seen.clear()
        await aiostage.persist({"w": torch.ones(10)}, tmp_path / "ckpt.pt")
        assert seen and set(seen) == {want}, (env, seen)
        assert await run_background(_own_niceness) == want
        _threads._background_pool().shutdown()
    assert _own_niceness() == base
    assert await run_sync(_own_niceness) == base  # anyio's threads are left alone


@pytest.mark.parametrize("bad", ["x", "-1", "20"])
def test_bad_background_nice_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(_threads.BACKGROUND_NICE_ENV, bad)
    with pytest.raises(ValueError, match=_threads.BACKGROUND_NICE_ENV):
        _threads.background_executor()


_FIRST_CALLS = """
import asyncio, sys
import torch
import aiostage

async def main():
    state = {"w": torch.ones(1000), "b": torch.zeros(10)}
    before = set(sys.modules)
    async with aiostage.DefaultStager() as stager:
        await stager.stage(state)
        await (await stager.save(state, sys.argv[1])).wait()
    print(sorted(set(sys.modules) - before))

asyncio.run(main())
"""


def test_first_calls_import_nothing_on_the_event_loop(tmp_path: Path) -> None:
    """anyio imports its asyncio backend (about 20 modules) on first use; an
    import inside the first stage() held the loop 10-30 ms.  aiostage
    imports it with itself, so a fresh process's first calls import nothing."""
    result = subprocess.run(
        [sys.executable, "-c", _FIRST_CALLS, str(tmp_path / "ckpt.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
