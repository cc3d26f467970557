"""Worker-thread steps are never abandoned, even on a plain ``Task.cancel()``."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from _frees import watch_frees

from aiostage._persist import _writer
from aiostage._persist._writer import persist
from aiostage._threads import run_sync

MiB = 1024 * 1024


def threads_inside(function_name: str) -> list[str]:
    """Names of threads whose current stack includes ``function_name``."""
    names = {t.ident: t.name for t in threading.enumerate()}
    found = []
    for ident, frame in sys._current_frames().items():
        if any(f.name == function_name for f in traceback.extract_stack(frame)):
            found.append(names.get(ident, str(ident)))
    return found


async def test_cancelled_step_waits_for_its_thread() -> None:
    gate = threading.Event()
    started = anyio.Event()
    finished: list[bool] = []
    token = anyio.lowlevel.current_token()

    def blocking() -> str:
        anyio.from_thread.run_sync(started.set, token=token)
        gate.wait()
        finished.append(True)
        return "result"

    task = asyncio.create_task(run_sync(blocking))
    try:
        await started.wait()
        task.cancel()
        for _ in range(5):  # let the cancellation be delivered, and re-delivered
            await asyncio.sleep(0)
            task.cancel()
        assert not task.done()  # still waiting for the thread, not abandoned
    finally:
        gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]


async def test_errors_and_results_pass_through() -> None:
    assert await run_sync(lambda a, b: a + b, 2, 3) == 5

    def fail() -> None:
        raise OSError(5, "boom")

    with pytest.raises(OSError, match="boom"):
        await run_sync(fail)


async def test_cancelled_persist_waits_for_the_chunk_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_write = anyio.Event()
    release = threading.Event()
    writes_after_cancel: list[int] = []
    token = anyio.lowlevel.current_token()
    real_write_batch = _writer._write_batch

    def instrumented_write_batch(fd: int, temp: Any, batch: list[Any]) -> None:
        # Pauses the first storage chunk's write inside its worker thread.
        first = not in_write.is_set()
        if first:
            anyio.from_thread.run_sync(in_write.set, token=token)
            release.wait()
        real_write_batch(fd, temp, batch)
        if first:
            writes_after_cancel.append(batch[0].rec.data_offset)

    monkeypatch.setattr(_writer, "_write_batch", instrumented_write_batch)
    target = tmp_path / "c.pt"
    state = {f"w{i}": torch.ones(4 * MiB) for i in range(2)}
    task = asyncio.create_task(persist(state, target, _chunk_bytes=16 * MiB))
    try:
        await in_write.wait()
        task.cancel()
        for _ in range(5):  # deliver (and re-deliver) the cancellation
            await asyncio.sleep(0)
            task.cancel()
        assert not task.done()  # waiting for the chunk in flight, not abandoning it
        assert os.listdir(tmp_path) != []  # the temp file is still there, fd open
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writes_after_cancel != []  # the chunk completed before the cleanup ran
    assert threads_inside("_write_batch") == []
    assert os.listdir(tmp_path) == []


async def test_anyio_cancel_scope_cancels_persist(tmp_path: Path) -> None:
    import aiostage

    target = tmp_path / "c.pt"
    await aiostage.persist({"old": torch.ones(2)}, target)
    state = {f"w{i}": torch.ones(4 * MiB) for i in range(4)}
    with anyio.CancelScope() as scope:

        def progress(done: int, total: int) -> None:
            if done > 1024:  # the first storage chunk is written
                scope.cancel()

        await persist(state, target, progress=progress, _chunk_bytes=4 * MiB)
    assert scope.cancelled_caught
    assert os.listdir(tmp_path) == ["c.pt"]
    assert list((await aiostage.load(target)).keys()) == ["old"]


FORK_CHILD = """
import asyncio, os, sys, torch
from aiostage._persist import _atomic, _writer

_atomic.HOLD_MIN_BYTES = 0  # every replaced file goes through the release thread
directory = sys.argv[1]
state = {"w": torch.ones(1 << 20)}  # made before the fork: torch's OpenMP pool is not fork-safe


async def save(name):
    await _writer.persist(state, os.path.join(directory, name))


asyncio.run(save("a.pt"))
asyncio.run(save("a.pt"))  # the CRC, release and background pools now exist
pid = os.fork()
if pid == 0:
    try:
        asyncio.run(save("b.pt"))
        asyncio.run(save("b.pt"))
    except BaseException:
        os._exit(3)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_persists_with_pools_of_its_own(tmp_path: Path) -> None:
    """A child forked after writes has none of the parent's threads: it gets
    fresh pools, and waits for none of the parent's pending releases."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", FORK_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CHILD 0" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]


async def test_the_writes_records_are_freed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write holds an object per storage and per piece: 20,000 of them
    freed when persist() returned held the loop 6-11 ms.  A worker thread
    empties those lists before it returns."""
    freed = watch_frees(monkeypatch, _writer)
    state = {f"t{i}": torch.full((4,), float(i)) for i in range(50)}
    state["big"] = torch.zeros(3 * MiB // 4)
    await persist(state, tmp_path / "ck.pt")
    on_loop = [n for main, n in freed if main]
    assert on_loop == []
    assert sum(n for _, n in freed) >= 2 * 51  # every storage's record and its piece(s)
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["t7"][0] == 7.0
