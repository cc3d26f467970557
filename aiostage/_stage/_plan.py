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

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import anyio
import torch

__all__ = ["CopyBatch", "CopyRequest", "Segment", "StagePlan", "byte_view"]


@dataclasses.dataclass(frozen=True, slots=True)
class CopyRequest:
    """Copy one unique source storage into its staging storage.

    Attributes:
        src: the original storage (any device).
        dst: the CPU storage the staged tensors point at.
        nbytes: bytes to copy (both storages have this size).
        path: key path of the first tensor found on ``src``, for errors.
        pin: ``dst`` is fresh and must be pinned before the first copy.
    """

    src: torch.UntypedStorage
    dst: torch.UntypedStorage
    nbytes: int
    path: str
    pin: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """Bytes ``[start, stop)`` of request number ``request``."""

    request: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True, slots=True)
class CopyBatch:
    """One unit of copy work: whole small storages or a slice of a big one."""

    segments: tuple[Segment, ...]
    nbytes: int


def byte_view(
    storage: torch.UntypedStorage, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """A flat ``uint8`` tensor over bytes ``[start, stop)`` of ``storage`` (no copy)."""
    end = storage.nbytes() if stop is None else stop
    return torch.empty((0,), dtype=torch.uint8, device=storage.device).set_(
        storage, start, (end - start,), (1,)
    )


class StagePlan:
    """The staged object's skeleton plus the copies that fill it.

    ``result`` must not be handed to the caller before every request has
    landed.  ``new_entries`` lists the (source, destination) storage pairs the
    traversal allocated; the engine adds them to its cache only when the whole
    plan succeeded (:meth:`StateDictStager.commit`), so a failed or cancelled
    stage leaves nothing half-staged in the cache.
    """

    def __init__(
        self,
        result: Any,
        requests: list[CopyRequest],
        new_entries: list[tuple[torch.UntypedStorage, torch.UntypedStorage]],
    ) -> None:
        self.result = result
        self.requests = requests
        self.new_entries = new_entries
        self.nbytes = sum(r.nbytes for r in requests)
        self._remaining = [0] * len(requests)
        self._by_dst = {r.dst._cdata: i for i, r in enumerate(requests)}
        self._landed: dict[int, anyio.Event] = {}
        self._failed: BaseException | None = None
        self.bytes_done = 0

    # -- batching -------------------------------------------------------------

    def batches(self, chunk_bytes: int, indices: Iterable[int] | None = None) -> list[CopyBatch]:
        """Split the requests (all, or those at ``indices``) into batches of at
        most ``chunk_bytes`` each.

        Small storages are grouped, big ones are cut; the order of requests is
        kept so that storages land in the order a writer wants them.  Call it
        once per plan: it arms the landed-tracking.  Empty storages have
        landed from the start.
        """
        out: list[CopyBatch] = []
        pending: list[Segment] = []
        size = 0
        for index in range(len(self.requests)) if indices is None else indices:
            req = self.requests[index]
            if req.nbytes == 0:
                continue
            start = 0
            while start < req.nbytes:
                take = min(req.nbytes - start, chunk_bytes - size)
                pending.append(Segment(index, start, start + take))
                self._remaining[index] += 1
                start += take
                size += take
                if size >= chunk_bytes:
                    out.append(CopyBatch(tuple(pending), size))
                    pending, size = [], 0
        if pending:
            out.append(CopyBatch(tuple(pending), size))
        return out

    # -- completion tracking (loop thread only) ------------------------------

    def batch_done(self, batch: CopyBatch) -> None:
        """Record that every segment of ``batch`` has landed."""
        for seg in batch.segments:
            self._remaining[seg.request] -= 1
            if self._remaining[seg.request] == 0:
                event = self._landed.get(seg.request)
                if event is not None:
                    event.set()
        self.bytes_done += batch.nbytes

    def fail(self, exc: BaseException) -> None:
        """Wake every waiter: the copies will not complete."""
        self._failed = exc
        for event in self._landed.values():
            event.set()

    def is_landed(self, index: int) -> bool:
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
