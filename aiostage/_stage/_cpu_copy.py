"""Stage on CPU: copy plan batches in worker threads, in order, a few at a time.

torch's ``copy_`` releases the GIL for the byte copy, so worker threads copy
at memory bandwidth while the event loop keeps running.  Batches are handed
out in plan order, so storages land roughly in the order a pipelined writer
consumes them.

Cancellation never abandons a thread: ``anyio.to_thread.run_sync`` waits for
the batch in flight, so once the copier has returned no thread writes into
a staging buffer any more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import anyio
import anyio.to_thread

from aiostage._exceptions import StagingError
from aiostage._stage._engine import pin_storage
from aiostage._stage._plan import CopyBatch, CopyRequest, byte_view
from aiostage._stage._traverse import format_path

__all__ = ["copy_batch", "run_in_threads"]


def copy_batch(requests: Sequence[CopyRequest], batch: CopyBatch) -> None:
    """Copy every segment of ``batch`` (blocking; for worker threads).

    Raises:
        StagingError: a copy failed; ``.path`` names a tensor on the storage.
    """
    for seg in batch.segments:
        req = requests[seg.request]
        try:
            if req.pin and seg.start == 0:
                pin_storage(req.dst)
            # Tensor copy_ releases the GIL (UntypedStorage.copy_ does not).
            byte_view(req.dst, seg.start, seg.stop).copy_(byte_view(req.src, seg.start, seg.stop))
        except Exception as exc:
            raise StagingError(
                f"copying {req.nbytes} bytes failed: {exc}", path=format_path(req.path)
            ) from exc


async def run_in_threads(
    requests: Sequence[CopyRequest],
    batches: Iterable[CopyBatch],
    threads: int,
    on_done: Callable[[CopyBatch], None],
    copy: Callable[[Sequence[CopyRequest], CopyBatch], None] = copy_batch,
) -> None:
    """Copy ``batches`` with up to ``threads`` worker threads.

    ``on_done`` is called on the loop thread after each batch has landed.

    Cancellation: no new batch starts; batches already in a thread finish
    before this returns (or raises), so nothing writes afterwards.
    """
    pending = iter(batches)
    limiter = anyio.CapacityLimiter(threads)

    async def worker() -> None:
        for batch in pending:
            await anyio.to_thread.run_sync(copy, requests, batch, limiter=limiter)
            on_done(batch)

    if threads == 1:
        await worker()
        return
    # Errors are kept out of the task group (which would wrap them in an
    # ExceptionGroup): the first one cancels the other workers, which finish
    # their batch in flight, and is then raised as it is.
    errors: list[Exception] = []

    async def guarded(scope: anyio.CancelScope) -> None:
        try:
            await worker()
        except Exception as exc:
            errors.append(exc)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        for _ in range(threads):
            tg.start_soon(guarded, tg.cancel_scope)
    if errors:
        raise errors[0]
