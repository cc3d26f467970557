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

import asyncio
import collections
import ctypes
import operator
import queue
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate, repeat
from typing import Any

import anyio
import torch

from aiostage._exceptions import StagingError
from aiostage._stage._engine import pin_storage
from aiostage._stage._plan import (
    MAX_SEGMENTS,
    CopyBatch,
    CopyRequest,
    Segment,
    StagePlan,
    byte_view,
    copy_failed,
)
from aiostage._stage._traverse import format_path
from aiostage._threads import run_all, run_sync, uncancelled

__all__ = ["EarlyCopies", "copy_batch", "run_in_threads"]

_memmove = ctypes.memmove
_request_nbytes = operator.attrgetter("nbytes")
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_new_tuple = tuple.__new__  # a NamedTuple's own __new__ is a Python call


def _shrank(req: CopyRequest) -> RuntimeError:
    return RuntimeError(
        f"the source storage shrank to {req.src.nbytes()} bytes during the stage "
        f"(planned {req.nbytes}); do not resize tensors while they are being staged"
    )


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
                        raise _shrank(req)
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
                raise copy_failed(req, exc) from exc
        if dsts:
            try:
                torch._foreach_copy_(dsts, srcs)
            except Exception as batched:
                # Find the culprit one by one, for an error that names it.
                for seg in batch.segments:
                    pair = whole.get(seg.request) if whole else None
                    if pair is not None:
                        req = requests[seg.request]
                        try:
                            pair[1].copy_(pair[0])
                        except Exception as exc:
                            raise copy_failed(req, exc) from exc
                req = requests[batch.segments[0].request]
                msg = f"copying {len(dsts)} tensors at once failed: {batched}"
                raise StagingError(msg, path=format_path(req.path)) from batched


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


#: While the plan is still being checked, take up to this many segments per
#: batch: each batch costs the copy thread two turns of the GIL, which the
#: busy loop hands over only between its slices.
EARLY_SEGMENTS = 2048


def _copy_prepared(
    requests: Sequence[CopyRequest],
    batch: CopyBatch,
    whole: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    srcs: list[torch.Tensor],
    dsts: list[torch.Tensor],
    single: bool,
) -> None:
    """:func:`copy_batch`, given the tensor pairs of a batch whose segments
    are all whole dense requests (else ``srcs`` and ``dsts`` are empty).

    With ``single``, segments that are not such a pair are copied by one
    plain ``memmove`` each instead of torch's copy, whose intra-op threads
    would take the core that the event loop checks the rest of the plan on.
    """
    if not srcs or len(srcs) != len(batch.segments):
        if not single:
            copy_batch(requests, batch, whole)
            return
        srcs, dsts = [], []
        for seg in batch.segments:
            req = requests[seg.request]
            pair = whole.get(seg.request) if seg.stop - seg.start == req.nbytes else None
            if pair is not None:
                srcs.append(pair[0])
                dsts.append(pair[1])
            elif req.src.nbytes() < seg.stop:  # raw pointers: check the bounds
                exc = _shrank(req)
                raise copy_failed(req, exc) from exc
            else:
                at = req.dst.data_ptr() + seg.start
                _memmove(at, req.src.data_ptr() + seg.start, seg.stop - seg.start)
        if not srcs:
            return
    with torch.no_grad():
        try:
            torch._foreach_copy_(dsts, srcs)
        except Exception:
            copy_batch(requests, batch, whole)  # one by one, for an error that names it
            raise


_Prepared = tuple[CopyBatch, list[torch.Tensor], list[torch.Tensor]]


class EarlyCopies:
    """CPU copies that start while their plan is still being checked.

    Staging the same state again replays the last plan (see
    ``StateDictStager.plan``): the event loop checks the tensors block by
    block, in slices, and each block that passes is final.  Its copies can
    run in a worker thread while the loop checks the next blocks, instead of
    after the last one; for 20,000 small tensors the checks and the copies
    take about as long as each other.

    The engine reports checked requests through :meth:`checked` (its
    ``on_checked`` hook).  Once the plan exists, :meth:`attach` hands it the
    batches that have landed, and :meth:`finish` waits for the rest.  If
    the replay gave up (its plan is not the one the copies were for) or
    planning failed, :meth:`abandon` waits for the copies in flight: they
    wrote the right bytes into the right staging storages, and the plan
    built afresh copies them again.

    Like :func:`run_in_threads`, no copy runs on after :meth:`finish` or
    :meth:`abandon` returns, however the caller was cancelled.
    """

    def __init__(self, threads: int, chunk_bytes: int) -> None:
        self._threads = threads
        self._chunk = chunk_bytes
        self._requests: list[CopyRequest] = []
        self._whole: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ranges: collections.deque[list[int]] = collections.deque()  # [next, stop)
        self._at = 0  # bytes of the first range's first request handed out
        self._covered = 0  # requests reported final
        self._pending = 0  # bytes reported final, not yet queued
        self._split: dict[int, int] = {}  # extra segments per request, until attach
        self._landed: list[CopyBatch] = []  # until attach
        self._plan: StagePlan | None = None
        self._final = False  # no more requests will come
        self._stop = False  # copy no more batches
        self._error: Exception | None = None
        # Batches go to the copy threads through a queue, not one hand-off
        # each: a thread handed back to the loop per batch waited for the
        # busy loop a few milliseconds each time.
        self._queue: queue.SimpleQueue[_Prepared | None] = queue.SimpleQueue()
        self._workers: list[asyncio.Task[None]] = []

    def owns(self, plan: StagePlan) -> bool:
        """Whether ``plan`` is the plan these copies were started for, and
        every one of its requests was reported."""
        return (
            bool(self._workers)
            and plan.requests is self._requests
            and self._covered == len(plan.requests)
        )

    # -- loop thread ---------------------------------------------------------

    def checked(
        self,
        requests: list[CopyRequest],
        whole: dict[int, tuple[torch.Tensor, torch.Tensor]],
        start: int,
        stop: int,
    ) -> None:
        """The engine's ``on_checked``: ``requests[start:stop]`` may be copied."""
        if self._stop or stop <= start:
            return
        self._requests, self._whole = requests, whole
        self._ranges.append([start, stop])
        self._covered += stop - start
        self._pending += sum(map(_request_nbytes, requests[start:stop]))
        self._feed(full_only=True)
        self._start(1)  # one thread while the loop is busy checking

    def attach(self, plan: StagePlan) -> None:
        """Report to ``plan`` (whose requests these are) what has landed,
        and from now on each batch as it lands."""
        for index, extra in self._split.items():
            plan.split(index, extra)
        self._split.clear()
        self._plan = plan
        landed, self._landed = self._landed, []
        for batch in landed:
            plan.batch_done(batch)

    async def finish(self) -> None:
        """Wait for every copy of the attached plan.

        Raises:
            StagingError: a copy failed; ``.path`` names a tensor on it.

        Cancellation: no new copy starts; copies in flight are waited for.
        """
        self._final = True
        self._feed(full_only=False)
        self._start(self._threads)
        for _ in self._workers:
            self._queue.put(None)
        done = asyncio.gather(*self._workers)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self._stop = True
            await uncancelled(done)
            raise
        if self._error is not None:
            raise self._error

    async def abandon(self) -> None:
        """Start no more copies and wait for those in flight.

        Cancellation: absorbed until the copies in flight have finished,
        then re-raised.
        """
        self._stop = True
        if self._workers:
            for _ in self._workers:
                self._queue.put(None)
            await uncancelled(asyncio.gather(*self._workers))

    def _feed(self, full_only: bool) -> None:
        """Queue the batches ready; with ``full_only`` only full ones (the
        copy thread takes the GIL twice per batch, from a busy loop)."""
        while self._ranges:
            if full_only and self._pending < self._chunk and self._count() < EARLY_SEGMENTS:
                return
            taken = self._take()
            if taken is None:
                return
            self._queue.put(taken)

    def _count(self) -> int:
        return sum(stop - start for start, stop in self._ranges)

    def _start(self, threads: int) -> None:
        if self._stop:
            return
        loop = asyncio.get_running_loop()
        while len(self._workers) < threads:
            self._workers.append(loop.create_task(run_sync(self._drain, loop)))

    def _on_landed(self, batch: CopyBatch) -> None:
        if self._plan is not None:
            self._plan.batch_done(batch)
        else:
            self._landed.append(batch)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """A copy thread: copy queued batches until told to stop."""
        while not self._stop:
            item = self._queue.get()
            if item is None or self._stop:
                return
            batch, srcs, dsts = item
            try:
                _copy_prepared(self._requests, batch, self._whole, srcs, dsts, not self._final)
            except Exception as exc:
                if not isinstance(exc, StagingError):  # (a batched copy that failed as a whole)
                    error = copy_failed(self._requests[batch.segments[0].request], exc)
                    error.__cause__ = exc
                    exc = error
                self._error = self._error or exc
                self._stop = True
                return
            loop.call_soon_threadsafe(self._on_landed, batch)

    def _take(self) -> _Prepared | None:
        """The next batch: final requests not handed out yet, up to
        ``chunk_bytes`` and a number of segments, big ones cut into chunks;
        with the tensor pairs of its whole dense requests, listed here on the
        loop, so that the copy thread needs the GIL as little as possible
        (the loop is busy checking meanwhile)."""
        segments: list[Segment] = []
        srcs: list[torch.Tensor] = []
        dsts: list[torch.Tensor] = []
        paired = True  # every segment so far is a whole dense request
        size = 0
        requests, chunk, whole, ranges = self._requests, self._chunk, self._whole, self._ranges
        limit = MAX_SEGMENTS if self._final else EARLY_SEGMENTS
        while ranges and size < chunk and len(segments) < limit:
            span = ranges[0]
            index, stop = span
            if self._at == 0:
                # The common case, in C-level passes: a run of whole requests.
                room = min(stop, index + limit - len(segments))
                sizes = list(map(_request_nbytes, requests[index:room]))
                ends = list(accumulate(sizes))
                count = bisect_right(ends, chunk - size)
                if count and 0 not in sizes[:count]:
                    cut = index + count
                    pieces = zip(range(index, cut), repeat(0), sizes[:count])
                    segments += map(_new_tuple, repeat(Segment), pieces)
                    size += ends[count - 1]
                    if paired:
                        pairs: list[Any] = list(map(whole.get, range(index, cut)))
                        paired = None not in pairs
                        srcs += map(_first, pairs) if paired else ()
                        dsts += map(_second, pairs) if paired else ()
                    span[0] = cut
                    if cut >= stop:
                        ranges.popleft()
                    continue
            # One request at a time: empty, or cut into chunks.
            nbytes = requests[index].nbytes
            take = min(nbytes - self._at, chunk - size)
            if take > 0:
                if self._at > 0:  # the request's second segment or later
                    if self._plan is not None:
                        self._plan.split(index, 1)
                    else:
                        self._split[index] = self._split.get(index, 0) + 1
                segments.append(Segment(index, self._at, self._at + take))
                pair = whole.get(index) if take == nbytes else None
                paired = paired and pair is not None
                if pair is not None and paired:
                    srcs.append(pair[0])
                    dsts.append(pair[1])
                size += take
                self._at += take
            if self._at >= nbytes:
                self._at = 0
                span[0] = index + 1
                if span[0] >= stop:
                    ranges.popleft()
        self._pending -= size
        if not segments:
            return None
        if not paired:
            srcs, dsts = [], []
        return CopyBatch(tuple(segments), size), srcs, dsts
