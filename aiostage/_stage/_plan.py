"""Plan: what one stage call will copy, as frozen requests that carry their byte cost.

A :class:`StagePlan` is built by the traversal (see ``_traverse``) before any
byte moves.  It holds the staged object's skeleton, whose tensors already
point at their destination CPU storages, and one :class:`CopyRequest` per
unique source storage.  The copiers (CPU threads or an accelerator stream) then
execute the plan in :class:`CopyBatch` units of bounded size, and report each
finished batch back to the plan, which tells waiters (a pipelined writer, for
instance) when a storage's bytes have landed.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import anyio
import torch

from aiostage._exceptions import StagingError
from aiostage._stage._traverse import format_path

#: At most this many segments in one batch, so that per-batch bookkeeping (in
#: the copy thread and on the loop) stays short for states of tiny tensors.
MAX_SEGMENTS = 1024

__all__ = ["CopyBatch", "CopyRequest", "Segment", "StagePlan", "byte_view", "copy_failed"]

_request_nbytes = operator.attrgetter("nbytes")


class CopyRequest(NamedTuple):
    """Copy one unique source storage into its staging storage.

    Attributes:
        src: the original storage (any device).
        dst: the CPU storage the staged tensors point at.
        nbytes: bytes to copy (both storages have this size).
        path: key path of the first tensor found on ``src``, for errors
            (a linked ``(parent, key)`` tuple; see ``format_path``).
        pin: ``dst`` is fresh and must be pinned before the first copy.
        fresh: ``dst`` was just allocated and never written: the first copy
            into it pays its page faults (see ``_cpu_copy.copy_batch``).
    """

    src: torch.UntypedStorage
    dst: torch.UntypedStorage
    nbytes: int
    path: tuple[Any, ...]
    pin: bool = False
    fresh: bool = False


def copy_failed(req: CopyRequest, exc: BaseException) -> StagingError:
    """The error for a failed copy of ``req``'s storage, naming a tensor on it
    (raise it ``from exc``)."""
    return StagingError(f"copying {req.nbytes} bytes failed: {exc}", path=format_path(req.path))


class Segment(NamedTuple):
    """Bytes ``[start, stop)`` of request number ``request``."""

    request: int
    start: int
    stop: int


class CopyBatch(NamedTuple):
    """One unit of copy work: whole small storages or a slice of a big one."""

    segments: tuple[Segment, ...]
    nbytes: int


def byte_view(
    storage: torch.UntypedStorage, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """A flat ``uint8`` tensor over bytes ``[start, stop)`` of ``storage`` (no copy).

    Raises:
        ValueError: the bytes lie past the storage's end (it was resized
            since it was planned): ``set_`` would silently grow a resizable
            storage, here the caller's own.
    """
    size = storage.nbytes()
    end = size if stop is None else stop
    if not 0 <= start <= end <= size:
        raise ValueError(
            f"bytes [{start}, {end}) lie past the end of a storage of {size} bytes; "
            "do not resize tensors while they are being staged"
        )
    return torch.empty((0,), dtype=torch.uint8, device=storage.device).set_(
        storage, start, (end - start,), (1,)
    )


class StagePlan:
    """The staged object's skeleton plus the copies that fill it.

    ``result`` must not be handed to the caller before every request has
    landed.  ``new_entries`` lists the source storages whose staging storage
    the traversal allocated and cached; the engine takes them out of its cache
    again unless the whole plan succeeds (:meth:`StateDictStager.discard`), so
    a failed or cancelled stage leaves nothing half-staged in the cache.
    """

    def __init__(
        self,
        result: Any,
        requests: list[CopyRequest],
        new_entries: list[torch.UntypedStorage],
        whole: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        by_dst: dict[int, int] | None = None,
        *,
        sizes: list[int] | None = None,
    ) -> None:
        self.result = result
        self.requests = requests
        self.new_entries = new_entries
        #: request index -> (source, staged) tensors spanning the whole
        #: storage densely; such copies can be batched tensor-to-tensor.
        self.whole = whole if whole is not None else {}
        # Built incrementally by the engine when it has them, since for tens
        # of thousands of storages they take milliseconds.
        if by_dst is None:
            by_dst = {r.dst._cdata: i for i, r in enumerate(requests)}
        self._by_dst = by_dst
        if sizes is None:  # (``sizes``: the requests' nbytes, when the caller has them)
            sizes = list(map(_request_nbytes, requests))  # C-level: tens of thousands add up
        self.nbytes = sum(sizes)
        # Segments not yet landed per request, plus one until its batches exist.
        self._remaining = [1] * len(sizes) if all(sizes) else [1 if n else 0 for n in sizes]
        self._landed: dict[int, anyio.Event] = {}
        self._unapplied: list[CopyBatch] = []  # landed while nobody waited
        self._failed: BaseException | None = None
        self.bytes_done = 0
        #: Key path of a tensor viewing an already-seen storage with another
        #: dtype (such a state stages, but cannot be persisted), else None.
        self.mixed_dtypes: str | None = None
        #: The engine's record for staging the same state again without a
        #: traversal (kept by ``commit``); opaque here.
        self.replay: Any = None
        self._by_device: dict[torch.device, list[int]] | None = None

    def by_device(self) -> dict[torch.device, list[int]]:
        """Request indices grouped by their source's device, in order (computed once;
        a replayed plan gets them from the plan it replays)."""
        if self._by_device is None:
            groups: dict[torch.device, list[int]] = {}
            for index, req in enumerate(self.requests):
                groups.setdefault(req.src.device, []).append(index)
            self._by_device = groups
        return self._by_device

    # -- batching -------------------------------------------------------------

    def batches(
        self, chunk_bytes: int, indices: Iterable[int] | None = None
    ) -> Iterator[CopyBatch]:
        """Split the requests (all, or those at ``indices``) into batches of at
        most ``chunk_bytes`` bytes and ``MAX_SEGMENTS`` segments each.

        Small storages are grouped, big ones are cut; the order of requests is
        kept so that storages land in the order a writer wants them.  The
        batches are produced lazily, so that a state of many tensors costs the
        event loop a little per batch instead of all at once.  Iterate it once
        per request: it arms the landed-tracking.
        """
        pending: list[Segment] = []
        size = 0
        remaining = self._remaining
        requests = self.requests
        new_segment = tuple.__new__  # a NamedTuple's own __new__ is a Python call
        for index in range(len(requests)) if indices is None else indices:
            nbytes = requests[index].nbytes
            if 0 < nbytes <= chunk_bytes - size:
                # The common case of a small storage: one segment, its last.
                pending.append(new_segment(Segment, (index, 0, nbytes)))
                size += nbytes
                if size >= chunk_bytes or len(pending) >= MAX_SEGMENTS:
                    yield CopyBatch(tuple(pending), size)
                    pending, size = [], 0
                continue
            start = 0
            while start < nbytes:
                take = min(nbytes - start, chunk_bytes - size)
                pending.append(Segment(index, start, start + take))
                start += take
                size += take
                # The request's "not started" token goes with its last segment.
                remaining[index] += 0 if start == nbytes else 1
                if size >= chunk_bytes or len(pending) >= MAX_SEGMENTS:
                    yield CopyBatch(tuple(pending), size)
                    pending, size = [], 0
        if pending:
            yield CopyBatch(tuple(pending), size)

    # -- completion tracking (loop thread only) ------------------------------

    def split(self, index: int, extra: int) -> None:
        """Request ``index`` is copied in ``extra`` more segments than one
        (by a copier that cuts its own batches instead of :meth:`batches`)."""
        self._remaining[index] += extra

    def batch_done(self, batch: CopyBatch) -> None:
        """Record that every segment of ``batch`` has landed.

        While nobody waits for a storage (a plain ``stage()``), the
        per-segment bookkeeping is put off until someone asks: for tens of
        thousands of small storages it costs the loop milliseconds.
        """
        self.bytes_done += batch.nbytes
        if self._landed:
            self._apply(batch)
        else:
            self._unapplied.append(batch)

    def _apply(self, batch: CopyBatch) -> None:
        remaining, landed = self._remaining, self._landed
        for seg in batch.segments:
            remaining[seg.request] -= 1
            if remaining[seg.request] == 0:
                event = landed.get(seg.request)
                if event is not None:
                    event.set()

    def _apply_unapplied(self) -> None:
        batches, self._unapplied = self._unapplied, []
        for batch in batches:
            self._apply(batch)

    def fail(self, exc: BaseException) -> None:
        """Wake every waiter: the copies will not complete."""
        self._failed = exc
        for event in self._landed.values():
            event.set()

    def is_landed(self, index: int) -> bool:
        self._apply_unapplied()
        return self._remaining[index] == 0

    async def wait_landed(self, storage: torch.UntypedStorage) -> None:
        """Return once ``storage`` (a destination of this plan) holds its bytes.

        Returns at once for a storage this plan does not write (its bytes
        are already there).  Raises ``RuntimeError`` if the copies failed or
        were cancelled.

        Cancellation: only the wait is cancelled; the copies go on.
        """
        index = self._by_dst.get(storage._cdata)
        if index is None:
            return
        self._apply_unapplied()
        if self._remaining[index] > 0 and self._failed is None:
            event = self._landed.get(index)
            if event is None:
                event = self._landed[index] = anyio.Event()
            await event.wait()
        if self._failed is not None and self._remaining[index] > 0:
            raise RuntimeError("staging did not complete") from self._failed

    def storages(self) -> Iterator[torch.UntypedStorage]:
        """The destination storages, in request order."""
        return (r.dst for r in self.requests)
