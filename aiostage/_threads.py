"""Awaiting work that must finish even when the caller is cancelled.

Two kinds of work in aiostage must never be abandoned half-way: a worker
thread writing into a staging buffer or a file, and a cleanup step (waiting
for queued device copies, removing a temporary file, releasing buffers).

``anyio.to_thread.run_sync`` waits for its thread when the cancellation comes
from an anyio cancel scope, but a plain ``asyncio.Task.cancel()`` (what
``asyncio.timeout``, ``wait_for`` and ``Task.cancel`` do) makes it return at
once while the thread runs on; an anyio shielded scope does not stop such a
cancellation either.  A thread left running could write into a buffer its
owner has reused, or through a file descriptor that cleanup has closed.

:func:`uncancelled` runs an awaitable in its own task and keeps waiting for
it through any number of cancellations, then re-raises the first one.
:func:`run_sync` is that, around a worker thread.  :func:`run_background`
is the same on aiostage's own *background* threads, which run at a lower
CPU priority (see :data:`BACKGROUND_NICE_ENV`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread

# anyio imports its asyncio backend (about 20 modules, 10-30 ms here) the
# first time it is used: on the event loop, inside the first stage() or
# save().  Import it with aiostage instead, so that no call blocks the loop
# on imports.
with contextlib.suppress(ImportError):  # (a private module: if anyio moves it)
    importlib.import_module("anyio._backends._asyncio")

__all__ = [
    "BACKGROUND_NICE_ENV",
    "GilTurns",
    "BackgroundPool",
    "background_executor",
    "free_all_in_blocks",
    "free_in_blocks",
    "run_all",
    "run_background",
    "run_sync",
    "run_sync_stoppable",
    "uncancelled",
]

T = TypeVar("T")


async def uncancelled(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to completion, whatever cancels the caller.

    Cancellation:
        Absorbed until ``awaitable`` has finished; then the first
        cancellation is re-raised (its result or error is discarded).
    """
    step: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    cancelled: asyncio.CancelledError | None = None
    while not step.done():
        try:
            if cancelled is None:
                await asyncio.shield(step)
            else:
                # An anyio cancel scope re-delivers its cancellation on every
                # loop iteration; a shielded scope stops that (a plain
                # Task.cancel() still gets through and is absorbed here).
                with anyio.CancelScope(shield=True):
                    await asyncio.shield(step)
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc  # keep waiting for the step
        except BaseException:
            if cancelled is None:
                raise
            break
    if cancelled is not None:
        if not step.cancelled():
            step.exception()  # retrieved: superseded by the cancellation
        raise cancelled
    return step.result()


async def run_sync(
    func: Callable[..., T], *args: object, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """Run ``func(*args)`` in a worker thread; return its result.

    Cancellation:
        The thread is always waited for (never abandoned); further
        cancellations meanwhile are absorbed.  Once it has finished, the
        first cancellation is re-raised and its result or error discarded.
    """
    call = functools.partial(func, *args)
    return await uncancelled(anyio.to_thread.run_sync(call, limiter=limiter))


async def run_sync_stoppable(
    func: Callable[..., T], *args: object, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """Run ``func(stop, *args)`` in a worker thread; return its result.

    ``stop`` is a :class:`threading.Event` that is set at the first
    cancellation; ``func`` checks it between its steps and returns early.
    One thread step for a long series of steps, rather than a
    :func:`run_sync` call for each: every hop between the event loop and a
    worker thread is a wake-up each way, and the scheduler then tends to put
    the worker on the loop's core, where it takes the core from the loop (see
    ``aiostage._load._reader``).

    Cancellation:
        ``stop`` is set and the thread is waited for (never abandoned),
        further cancellations absorbed meanwhile; then the first
        cancellation is re-raised and the result or error discarded.
    """
    stop = threading.Event()
    call = functools.partial(func, stop, *args)
    step = asyncio.ensure_future(anyio.to_thread.run_sync(call, limiter=limiter))
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        stop.set()
        await uncancelled(asyncio.wait([step]))
        if not step.cancelled():
            step.exception()  # retrieved: superseded by the cancellation
        raise


async def run_all(jobs: Sequence[Callable[[], Awaitable[Any]]]) -> None:
    """Run ``jobs`` concurrently; the first error cancels the others and is
    raised as it is (not wrapped in an ExceptionGroup).

    Cancellation:
        Every job is cancelled and waited for before this re-raises.
    """
    if len(jobs) == 1:
        await jobs[0]()
        return
    errors: list[Exception] = []

    async def guarded(job: Callable[[], Awaitable[Any]], scope: anyio.CancelScope) -> None:
        try:
            await job()
        except Exception as exc:
            errors.append(exc)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(guarded, job, tg.cancel_scope)
    if errors:
        raise errors[0]


class GilTurns:
    """Lets other threads have the GIL during long pure-Python work in a
    worker thread.

    CPython hands the GIL to a waiting thread only after its switch
    interval (5 ms), and under load the event loop's thread can wait two or
    three of them: 10-20 ms of loop lag for one unpickle of a few hundred
    tensors, measured here.  Calling the instance at convenient points
    (once per tensor, say) releases the GIL with ``time.sleep(0)`` whenever
    ``every`` seconds have passed since the last turn.
    """

    def __init__(self, every: float = 0.001) -> None:
        self.every = every
        self._last = time.perf_counter()

    def __call__(self) -> None:
        now = time.perf_counter()
        if now - self._last > self.every:
            time.sleep(0)
            self._last = time.perf_counter()


FREE_BLOCK = 1000
"""Objects :func:`free_in_blocks` frees between two GIL turns."""


def free_in_blocks(items: list[Any], turn: GilTurns | None = None) -> None:
    """Empty ``items`` in place from the end, :data:`FREE_BLOCK` at a time,
    with a GIL turn between blocks (for a worker thread).

    Dropping the last reference to a list of tens of thousands of objects
    frees them all in one call, holding the GIL: 20,000 of a write's
    records and pieces took 6-11 ms on the event loop's thread when the
    write returned, and 16-17 ms for a pickle's memo.
    """
    turn = turn or GilTurns()
    while items:
        del items[-FREE_BLOCK:]
        turn()


def free_all_in_blocks(*containers: list[Any] | dict[Any, Any]) -> None:
    """:func:`free_in_blocks` for each list, and the same for each dict
    (emptied an item at a time), one GIL turn timer for them all."""
    turn = GilTurns()
    for items in containers:
        if isinstance(items, dict):
            while items:
                for _ in range(min(FREE_BLOCK, len(items))):
                    items.popitem()
                turn()
        else:
            free_in_blocks(items, turn)


BACKGROUND_NICE_ENV = "AIOSTAGE_BACKGROUND_NICE"
"""Environment variable: how much lower (``nice`` increment, 0-19, default
10) the CPU priority of the threads that write checkpoints is.  ``0`` keeps
them at the process's priority.

A checkpoint write runs after ``save()`` has returned, beside training.  On
a small machine its threads (writer, CRC-32) compete for the cores with the
event loop and the training threads; the kernel then lets the loop's thread
wait up to a time slice for a core.  On the 2-core development VM, niceness
10 cut the loop's p99 lag during ``save()`` from about 3 ms to 1.2-1.6 ms at
the same write time when the cores were otherwise idle.  A niced writer gets
a smaller share when the cores are saturated, so the write takes longer
then; staging copies (on the caller's critical path) and loads are not
niced.  Linux only (elsewhere ``setpriority`` would apply to the whole
process); read when the first background thread starts.
"""

_DEFAULT_BACKGROUND_NICE = 10


def _background_nice() -> int:
    raw = os.environ.get(BACKGROUND_NICE_ENV, "").strip()
    if not raw:
        return _DEFAULT_BACKGROUND_NICE
    try:
        value = int(raw)
    except ValueError:
        value = -1  # refused below, with the one message
    if not 0 <= value <= 19:
        raise ValueError(f"{BACKGROUND_NICE_ENV}={raw!r}: expected an integer from 0 to 19")
    return value


def lower_priority(increment: int) -> None:
    """Lower the calling thread's CPU priority by ``increment`` (a thread
    initializer).  Linux only: there ``setpriority`` on a thread id affects
    that thread alone.  Refusals are ignored (the thread then runs as is)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError:  # pragma: no cover - a sandbox that forbids it
        pass


def background_executor(
    name: str = "aiostage-background", workers: int = 8
) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads run at the background priority."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix=name,
        initializer=lower_priority,
        initargs=(_background_nice(),),
    )


class BackgroundPool:
    """A :func:`background_executor` made on first use (call the object).

    A forked child has none of its parent's threads, so every such pool is
    forgotten in the child and made afresh there: a pool inherited as is
    would take work and never run it.
    """

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        _POOLS.append(self)

    def __call__(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self.pool is None:
                self.pool = background_executor(self.name, self.workers)
            return self.pool

    def forget(self) -> None:
        self.pool = None
        self._lock = threading.Lock()  # a lock held at fork stays held in the child


_POOLS: list[BackgroundPool] = []


def _forget_pools() -> None:
    for pool in _POOLS:
        pool.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)

_background_pool = BackgroundPool("aiostage-background", 8)
"""The threads :func:`run_background` runs on."""


async def run_background(func: Callable[..., T], *args: object) -> T:
    """Like :func:`run_sync`, on one of aiostage's background threads
    (lower CPU priority, see :data:`BACKGROUND_NICE_ENV`).

    Cancellation:
        As :func:`run_sync`: the thread is always waited for, then the first
        cancellation is re-raised and the result discarded.
    """
    loop = asyncio.get_running_loop()
    return await uncancelled(
        loop.run_in_executor(_background_pool(), functools.partial(func, *args))
    )
