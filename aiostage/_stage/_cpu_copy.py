"""Stage on CPU: copy plan batches in worker threads, in order, a few at a time.

torch's ``copy_`` releases the GIL for the byte copy, so worker threads copy
at memory bandwidth while the event loop keeps running.  Batches are handed
out in plan order, so storages land roughly in the order a pipelined writer
consumes them.

Cancellation never abandons a thread (see ``aiostage._threads``): the batch
in flight is waited for, so once the copier has returned no thread writes
into a staging buffer any more, however the caller was cancelled.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable, Mapping, Sequence

import anyio
import torch

from aiostage._exceptions import StagingError
from aiostage._stage._engine import pin_storage
from aiostage._stage._plan import CopyBatch, CopyRequest, byte_view
from aiostage._stage._traverse import format_path
from aiostage._threads import run_all, run_sync

__all__ = ["copy_batch", "run_in_threads"]

_memmove = ctypes.memmove


def copy_batch(
    requests: Sequence[CopyRequest],
    batch: CopyBatch,
    whole: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Copy every segment of ``batch`` (blocking; for worker threads).

    Segments that are a whole storage spanned densely by a tensor (listed in
    ``whole``) are copied together with one ``torch._foreach_copy_`` call,
    which costs about a microsecond per tensor; the rest are copied as byte
    ranges.  Tensor ``copy_`` releases the GIL (``UntypedStorage.copy_`` does
    not), so large copies do not hold up the event loop.

    Raises:
        StagingError: a copy failed; ``.path`` names a tensor on the storage.
    """
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    with torch.no_grad():
        for seg in batch.segments:
            req = requests[seg.request]
            try:
                if req.pin and seg.start == 0:
                    pin_storage(req.dst)
                if req.fresh and req.src.device.type == "cpu":
                    if req.src.nbytes() < seg.stop:  # raw pointers: check the bounds
                        raise RuntimeError(
                            f"the source storage shrank to {req.src.nbytes()} bytes "
                            f"during the stage (planned {req.nbytes}); do not resize "
                            "tensors while they are being staged"
                        )
                    # Into never-written memory the copy is bound by page
                    # faults: one plain memmove (GIL released) takes about
                    # 0.4x the time of torch's copy, whose OpenMP threads
                    # contend on the faults and take the loop's core too.
                    at = req.dst.data_ptr() + seg.start
                    _memmove(at, req.src.data_ptr() + seg.start, seg.stop - seg.start)
                    continue
                pair = whole.get(seg.request) if whole else None
                if pair is not None and seg.start == 0 and seg.stop == req.nbytes:
                    srcs.append(pair[0])
                    dsts.append(pair[1])
                    continue
                byte_view(req.dst, seg.start, seg.stop).copy_(
                    byte_view(req.src, seg.start, seg.stop)
                )
            except Exception as exc:
                msg = f"copying {req.nbytes} bytes failed: {exc}"
                raise StagingError(msg, path=format_path(req.path)) from exc
        if dsts:
            try:
                torch._foreach_copy_(dsts, srcs)
            except Exception:
                # Find the culprit one by one, for an error that names it.
                for seg in batch.segments:
                    pair = whole.get(seg.request) if whole else None
                    if pair is not None:
                        req = requests[seg.request]
                        try:
                            pair[1].copy_(pair[0])
                        except Exception as exc:
                            msg = f"copying {req.nbytes} bytes failed: {exc}"
                            raise StagingError(msg, path=format_path(req.path)) from exc
                raise


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
            await run_sync(copy, requests, batch, limiter=limiter)
            on_done(batch)

    # The first error cancels the other workers, which finish their batch in
    # flight, and is then raised as it is.
    await run_all([worker] * threads)
