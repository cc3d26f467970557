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
:func:`run_sync` is that, around a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread

__all__ = ["GilTurns", "run_all", "run_sync", "uncancelled"]

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
