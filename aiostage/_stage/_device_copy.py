"""Stage from an accelerator: non-blocking copies on a side stream, polled events.

The copier issues each batch's device-to-host copies on a dedicated side
stream that first waits for the compute stream's pending work, records an
event after each batch, and polls the events (``event.query()``) from the
event loop, sleeping with a backoff in between.  The loop thread never
synchronizes a stream.

Everything device-specific goes through :class:`DeviceOps`, written against
torch's device-generic API (``torch.accelerator``, ``torch.Stream``,
``torch.Event``) so it serves CUDA and other accelerators alike.  The tests
substitute a simulated device whose copies complete later.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import torch

from aiostage._exceptions import StagingError
from aiostage._stage._cpu_copy import run_in_threads
from aiostage._stage._engine import pin_storage
from aiostage._stage._plan import CopyBatch, CopyRequest, byte_view
from aiostage._stage._traverse import format_path
from aiostage._threads import run_sync, uncancelled

__all__ = ["DeviceOps", "TorchDeviceOps", "run_on_stream"]

#: Polling backoff: first re-check after this long, doubling up to the max.
POLL_MIN_S = 0.0001
POLL_MAX_S = 0.002
#: Issue copies for at most this long before yielding to the loop.
ISSUE_BUDGET_S = 0.002


class EventLike(Protocol):
    def query(self) -> bool: ...


class DeviceOps(Protocol):
    """The device operations the copier needs; real or simulated."""

    def new_stream(self, device: torch.device) -> Any:
        """A side stream on ``device`` for staging copies."""

    def wait_for_compute(self, stream: Any, device: torch.device) -> None:
        """Order ``stream`` after the work already queued on the current stream."""

    def copy_async(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue ``dst.copy_(src)`` on ``stream`` without waiting for it."""

    def record_event(self, stream: Any) -> EventLike:
        """An event that completes once everything queued on ``stream`` has run."""

    def copy_blocking(self, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy on ``stream`` and wait for it (called from a worker thread)."""


class TorchDeviceOps:
    """:class:`DeviceOps` on a real accelerator via torch's generic stream API."""

    def new_stream(self, device: torch.device) -> torch.Stream:
        return torch.Stream(device=device)

    def wait_for_compute(self, stream: torch.Stream, device: torch.device) -> None:
        stream.wait_stream(torch.accelerator.current_stream(device))

    def copy_async(self, stream: torch.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with stream:
            dst.copy_(src, non_blocking=True)

    def record_event(self, stream: torch.Stream) -> torch.Event:
        event = torch.Event(device=stream.device)
        event.record(stream)
        return event

    def copy_blocking(self, stream: torch.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with stream:
            dst.copy_(src)
        stream.synchronize()


def _segments(
    requests: Sequence[CopyRequest], batch: CopyBatch
) -> Iterator[tuple[CopyRequest, torch.Tensor, torch.Tensor]]:
    for seg in batch.segments:
        req = requests[seg.request]
        try:
            dst, src = (
                byte_view(req.dst, seg.start, seg.stop),
                byte_view(req.src, seg.start, seg.stop),
            )
        except ValueError as exc:  # a source resized since the plan
            raise _copy_error(req, exc) from exc
        yield req, dst, src


def _copy_error(req: CopyRequest, exc: Exception) -> StagingError:
    return StagingError(
        f"device-to-host copy of {req.nbytes} bytes failed: {exc}", path=format_path(req.path)
    )


async def _wait_event(event: EventLike) -> None:
    delay = POLL_MIN_S
    while not event.query():
        await anyio.sleep(delay)
        delay = min(delay * 2, POLL_MAX_S)


async def run_on_stream(
    ops: DeviceOps,
    stream: Any,
    device: torch.device,
    requests: Sequence[CopyRequest],
    batches: Iterable[CopyBatch],
    on_done: Callable[[CopyBatch], None],
    *,
    non_blocking: bool,
) -> None:
    """Copy ``batches`` from ``device`` into their CPU staging storages.

    With ``non_blocking`` (pinned destinations) the copies are queued on
    ``stream`` from the loop thread and their events polled; otherwise each
    batch is copied on ``stream`` by a worker thread that waits for it.

    Cancellation: no new copy is issued; copies already queued are waited
    for (shielded) before the cancellation propagates, so the device never
    writes into a staging buffer after this returns.
    """
    ops.wait_for_compute(stream, device)
    if not non_blocking:

        def copy(reqs: Sequence[CopyRequest], batch: CopyBatch) -> None:
            for req in {
                reqs[s.request].dst._cdata: reqs[s.request] for s in batch.segments
            }.values():
                if req.pin:
                    pin_storage(req.dst)
            for req, dst, src in _segments(reqs, batch):
                try:
                    ops.copy_blocking(stream, dst, src)
                except Exception as exc:
                    raise _copy_error(req, exc) from exc

        await run_in_threads(requests, batches, 1, on_done, copy)
        return

    # Pin the fresh destinations first: it is slow, so it runs in a thread.
    to_pin = [r for r in requests if r.pin]
    if to_pin:

        def pin_all() -> None:
            for req in to_pin:
                pin_storage(req.dst)

        await run_sync(pin_all)

    inflight: collections.deque[tuple[EventLike, CopyBatch]] = collections.deque()
    try:
        deadline = time.perf_counter() + ISSUE_BUDGET_S
        for batch in batches:
            for req, dst, src in _segments(requests, batch):
                try:
                    ops.copy_async(stream, dst, src)
                except Exception as exc:
                    raise _copy_error(req, exc) from exc
            inflight.append((ops.record_event(stream), batch))
            while inflight and inflight[0][0].query():
                on_done(inflight.popleft()[1])
            if time.perf_counter() >= deadline:
                await anyio.lowlevel.checkpoint()
                deadline = time.perf_counter() + ISSUE_BUDGET_S
        while inflight:
            await _wait_event(inflight[0][0])
            on_done(inflight.popleft()[1])
    except BaseException:
        # Whatever went wrong, the device may still be writing into our
        # buffers: wait for every queued copy, even through cancellation.
        async def drain() -> None:
            while inflight:
                await _wait_event(inflight.popleft()[0])

        await uncancelled(drain())
        raise
