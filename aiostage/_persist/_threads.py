"""Worker-thread steps that are never abandoned, whatever cancels the caller.

``anyio.to_thread.run_sync`` waits for its thread when the cancellation comes
from an anyio cancel scope, but a plain ``asyncio.Task.cancel()`` (what
``SaveHandle.cancel()``, ``asyncio.timeout`` or ``wait_for`` do) makes it
return at once while the thread runs on.  A write thread left running could
then write through a file descriptor that the cleanup has closed (and the
OS has reused), or read a storage that has been freed.

:func:`run_sync` runs the step in its own task, awaits it through
:func:`asyncio.shield`, and on cancellation keeps waiting until the thread
has finished; only then is the (first) cancellation re-raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import anyio

__all__ = ["run_sync"]

T = TypeVar("T")


async def run_sync(func: Callable[..., T], *args: object) -> T:
    """Run ``func(*args)`` in a worker thread; return its result.

    Cancellation:
        The thread is always waited for (never abandoned); further
        cancellations meanwhile are absorbed.  Once it has finished, the
        first cancellation is re-raised and its result or error discarded.
    """
    step: asyncio.Future[T] = asyncio.ensure_future(anyio.to_thread.run_sync(func, *args))
    cancelled: asyncio.CancelledError | None = None
    while not step.done():
        try:
            await asyncio.shield(step)
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc  # keep waiting for the thread
        except BaseException:
            if cancelled is None:
                raise
            break
    if cancelled is not None:
        if step.done() and not step.cancelled():
            step.exception()  # retrieved: its outcome is superseded by the cancellation
        raise cancelled
    return step.result()
