"""The awaitable stagers: :class:`DefaultStager` and :class:`BlockingAsyncStager`.

Both follow the :class:`AsyncStager` protocol: ``await stage(state)``,
``await close()`` and ``async with``.  Both also persist (``persist`` for a
staged state, ``save`` for the pipelined stage-then-write).

Concurrency: a stager runs one operation on its buffers at a time.  A second
``stage()`` (or ``save()``) while one is in flight waits its turn; so does a
``stage()`` while a ``save()``'s background write still reads the buffers, so
a buffer is never overwritten while a writer reads it.
"""

from __future__ import annotations

import asyncio
import functools
import operator
import os
import types
import warnings
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel
import torch

from aiostage._exceptions import StagerClosedError, StagingError
from aiostage._gc import gc_paused
from aiostage._progress import Progress
from aiostage._stage._cpu_copy import EarlyCopies, copy_batch, run_in_threads
from aiostage._stage._device_copy import DeviceOps, TorchDeviceOps, run_on_stream
from aiostage._stage._engine import CacheInfo, OnChecked, StateDictStager
from aiostage._stage._options import StagingOptions
from aiostage._stage._plan import StagePlan
from aiostage._threads import run_all, run_sync, uncancelled

if TYPE_CHECKING:
    from pathlib import Path

    from aiostage._persist._handle import SaveHandle

__all__ = ["AsyncStager", "BlockingAsyncStager", "DefaultStager"]

T = TypeVar("T")
S = TypeVar("S", bound="_StagerBase")

#: How long the traversal may hold the event loop before yielding (seconds).
TRAVERSAL_BUDGET_S = 0.002


_is_fresh = operator.attrgetter("fresh")


def _refuse_mixed_dtypes(plan: StagePlan) -> None:
    """Refuse a plan that a checkpoint cannot hold (before ``save()`` writes)."""
    if plan.mixed_dtypes is not None:
        raise StagingError(
            "a storage is viewed with two dtypes; torch.save's format (and so a "
            "checkpoint) cannot hold that: save a copy of this tensor instead",
            path=plan.mixed_dtypes,
        )


async def _let_timers_run() -> None:
    """Yield to the event loop so that what became due during a slice of
    work runs before the next slice.

    A task that yields goes to the back of asyncio's ready queue, but the
    timers that expired during its slice are appended after it, and the
    coroutine a timer wakes is queued one turn later still.  With a single
    checkpoint, a coroutine sleeping 1 ms waited two slices (4.4 ms gaps
    with 2 ms slices, measured); three turns let it run in between.
    """
    for _ in range(3):
        await anyio.lowlevel.checkpoint()


@runtime_checkable
class AsyncStager(Protocol):
    """What every aiostage stager does."""

    async def stage(self, state_dict: Any) -> Any:
        """Return a CPU copy of ``state_dict``."""

    async def close(self) -> None:
        """Wait for in-flight work and release buffers."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None: ...


class _StagerBase:
    """Turn-taking, closing, ``async with``, ``persist`` and ``save``."""

    def __init__(self) -> None:
        self._turn = asyncio.Lock()
        self._closing = False
        self._closed = False
        self._handles: set[SaveHandle] = set()  # writes still running
        self._issued: weakref.WeakSet[SaveHandle] = weakref.WeakSet()  # every handle given out

    # -- subclass hooks ------------------------------------------------------

    async def _stage_locked(
        self, state_dict: Any, on_plan: Callable[[StagePlan], None] | None
    ) -> Any:
        raise NotImplementedError

    def _release_buffers(self) -> None:
        """Drop cached buffers (at close)."""

    # -- turn-taking ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise StagerClosedError(f"{type(self).__name__} is closed; create a new stager")

    async def _acquire(self) -> None:
        self._check_open()
        await self._turn.acquire()
        if self._closed:
            self._turn.release()
            self._check_open()

    # -- public --------------------------------------------------------------

    async def stage(self, state_dict: T) -> T:
        """Copy ``state_dict`` into CPU memory and return the copy.

        Returns once every copy has landed.  Until then the caller must not
        mutate ``state_dict``; afterwards it may.  The returned copy stays
        valid until the next ``stage()`` or ``save()`` on this stager, which
        refreshes the same buffers in place.

        Raises:
            StagingError: an object cannot be staged; ``.path`` names it.
            StagerClosedError: the stager was closed.

        Cancellation: no new copy starts; copies in flight are waited for, so
        nothing writes into a staging buffer afterwards.  Buffers allocated by
        this call are dropped; the cache stays consistent and the next
        ``stage()`` works.
        """
        await self._acquire()
        try:
            return await self._stage_locked(state_dict, None)  # type: ignore[no-any-return]
        finally:
            self._turn.release()

    async def persist(
        self, staged: Any, path: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Path:
        """Write a staged state durably and atomically to ``path``.

        See :func:`aiostage.persist`.  The write holds this stager's turn, so
        a ``stage()`` issued meanwhile waits instead of refreshing the buffers
        the writer reads.  (Module-level :func:`aiostage.persist` of a staged
        state does not know the stager: do not stage again until it returns.)

        Cancellation: the write stops after its chunk in flight, the
        temporary file is removed, and the previous checkpoint stays.
        """
        from aiostage._persist._writer import persist

        await self._acquire()
        try:
            return await persist(staged, path, progress=progress)
        finally:
            self._turn.release()

    async def save(
        self, state_dict: Any, path: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> SaveHandle:
        """Stage ``state_dict`` and write it to ``path`` in the background.

        Returns as soon as the state is staged: training may mutate the state
        again.  Each storage starts going to disk as soon as its copy has
        landed.  ``await handle.wait()`` returns the path once the file is
        durable, or raises the write's error.  Until the write finishes the
        stager's buffers are in use: the next ``stage()`` or ``save()`` on
        this stager waits for it.

        Raises:
            StagingError: an object cannot be staged, or the state cannot be
                written as a checkpoint (a storage viewed with two dtypes);
                nothing is written.
            StagerClosedError: the stager was closed.

        Cancellation: cancelling ``save()`` itself (before it returns) stops
        the copies and the write; the temporary file is removed and the
        previous checkpoint stays.  Once it has returned, cancel the write
        with ``handle.cancel()``.
        """
        from aiostage._persist._handle import SaveHandle
        from aiostage._persist._writer import persist

        await self._acquire()
        writers: list[asyncio.Task[Path]] = []

        def start_writer(plan: StagePlan) -> None:
            # Called once the plan exists (the skeleton is ready): the writer
            # runs beside the copies and takes each storage as it lands.
            _refuse_mixed_dtypes(plan)
            writers.append(
                asyncio.create_task(
                    persist(plan.result, path, wait_ready=plan.wait_landed, progress=progress)
                )
            )

        try:
            staged = await self._stage_locked(state_dict, start_writer)
        except BaseException:
            try:
                for writer in writers:
                    writer.cancel()
                if writers:
                    await uncancelled(asyncio.wait(writers))
            finally:
                self._turn.release()
            raise
        writer = writers[0]
        handle = SaveHandle(writer, staged=staged, on_finish=self._turn.release)
        self._handles.add(handle)
        self._issued.add(handle)
        writer.add_done_callback(lambda _: self._handles.discard(handle))
        return handle

    async def close(self) -> None:
        """Wait for in-flight stages and background writes, then release buffers.

        Idempotent.  Afterwards ``stage()`` and ``save()`` raise
        :class:`StagerClosedError`.

        Cancellation: close finishes even if cancelled, then re-raises.
        """
        await uncancelled(self._close())

    async def _close(self) -> None:
        if self._closed:
            return
        self._closing = True
        async with self._turn:
            self._closed = True
            # The save handles' staged copies point into the buffers: a
            # handle dropped later would free them (munmap: 0.2 s for 1 GiB
            # here) on the loop.  They are let go of in the thread below.
            held = [handle._release_staged() for handle in list(self._issued)]

            def release() -> None:
                held.clear()
                self._release_buffers()

            # Freeing gigabytes of buffers (munmap) takes tens of ms: not on
            # the loop.  Nothing else can use them: the turn is ours, for good.
            await run_sync(release)

    async def __aenter__(self: S) -> S:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        # On cancellation, background writes are cancelled (each removes its
        # temporary file and keeps the previous checkpoint); otherwise they
        # are waited for, so leaving the block means every save is durable.
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            for handle in list(self._handles):
                handle.cancel()
        await self.close()


async def _drive(gen: Generator[None, None, T]) -> T:
    """Run one of the engine's time-sliced generators on the loop, letting
    the timers due run between its slices; its return value."""
    try:
        while True:
            gen.send(None)
            await _let_timers_run()
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        gen.close()


class DefaultStager(_StagerBase):
    """The full-featured stager: background copies, cached buffers, pipelining.

    On CPU the copies run in worker threads in bounded chunks.  From an
    accelerator they are queued non-blocking on a side stream (ordered after
    the compute stream's pending work) and their events are polled, so the
    event loop keeps running; the Python traversal of the state also runs on
    the loop in slices of a couple of milliseconds.

    Usage::

        async with DefaultStager() as stager:
            staged = await stager.stage(model.state_dict())
    """

    def __init__(
        self, options: StagingOptions | None = None, *, _device_ops: DeviceOps | None = None
    ) -> None:
        super().__init__()
        self.options = options if options is not None else StagingOptions()
        with warnings.catch_warnings():
            if self.options.use_pinned_memory is None:
                warnings.simplefilter("ignore", RuntimeWarning)
            self._engine = StateDictStager(
                pin_memory=self.options.pinned,
                share_memory=self.options.use_shared_memory,
                pin_memory_min_bytes=self.options.pin_memory_min_bytes,
            )
        self._device_ops = _device_ops
        self._streams: dict[torch.device, Any] = {}

    def cache_info(self) -> CacheInfo:
        """The staging storages kept for reuse (see :meth:`StateDictStager.cache_info`)."""
        return self._engine.cache_info()

    def _release_buffers(self) -> None:
        self._engine.close()
        self._streams.clear()

    async def _plan(self, state_dict: Any, on_checked: OnChecked | None = None) -> StagePlan:
        budget = TRAVERSAL_BUDGET_S if self.options.use_async_staging else None
        return await _drive(self._engine.plan(state_dict, budget_s=budget, on_checked=on_checked))

    async def _allocate_ahead(self, state_dict: Any) -> None:
        """Allocate the staging storages the plan will need (a first stage,
        new tensors) in a worker thread, not on the loop as the plan would
        (see :meth:`StateDictStager.allocate`).  Not before a plan that will
        likely replay the last one: it allocates nothing, and the walk costs
        1.6 us per tensor."""
        sizes = await _drive(self._engine.fresh_sizes(state_dict, TRAVERSAL_BUDGET_S))
        if sizes:
            await run_sync(self._engine.allocate, sizes)

    async def _stage_locked(
        self, state_dict: Any, on_plan: Callable[[StagePlan], None] | None
    ) -> Any:
        with gc_paused():  # see aiostage._gc: no full collections mid-stage
            return await self._stage_paused(state_dict, on_plan)

    async def _stage_paused(
        self, state_dict: Any, on_plan: Callable[[StagePlan], None] | None
    ) -> Any:
        if self.options.use_async_staging and not self._engine.replaying:
            await self._allocate_ahead(state_dict)
        # A replayed plan of CPU tensors is checked block by block on the
        # loop; the copies of checked blocks start meanwhile (EarlyCopies).
        early = None
        if self.options.use_async_staging and self._device_ops is None:
            early = EarlyCopies(self.options.threads, self.options.chunk_bytes)
        try:
            plan = await self._plan(state_dict, None if early is None else early.checked)
        except BaseException:
            if early is not None:
                await early.abandon()
            raise
        try:
            if early is not None:
                if early.owns(plan):
                    early.attach(plan)
                else:  # the replay gave up: its copies land before the plan's
                    await early.abandon()
                    early = None
            if on_plan is not None:
                on_plan(plan)
            if early is not None:
                await early.finish()
            else:
                await self._execute(plan)
        except BaseException as exc:
            if early is not None:
                await early.abandon()
            plan.fail(exc)
            self._engine.discard(plan)
            raise
        self._engine.commit(plan)
        return plan.result

    async def _execute(self, plan: StagePlan) -> None:
        opts = self.options
        if not opts.use_async_staging and self._device_ops is None:
            for batch in plan.batches(opts.chunk_bytes):
                copy_batch(plan.requests, batch, plan.whole)
                plan.batch_done(batch)
            return
        jobs = [self._job(plan, device, idx) for device, idx in plan.by_device().items()]
        await run_all(jobs)

    def _job(self, plan: StagePlan, device: torch.device, indices: list[int]) -> Callable[[], Any]:
        opts = self.options
        batches = plan.batches(opts.chunk_bytes, indices)
        if device.type == "cpu" and self._device_ops is None:
            copy = functools.partial(copy_batch, whole=plan.whole)
            threads = opts.threads
            if opts.copy_threads is None and any(map(_is_fresh, plan.requests)):
                threads = 1  # into new buffers: see StagingOptions.copy_threads
            return functools.partial(
                run_in_threads, plan.requests, batches, threads, plan.batch_done, copy
            )
        ops: DeviceOps = self._device_ops if self._device_ops is not None else TorchDeviceOps()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = ops.new_stream(device)
        non_blocking = opts.non_blocking and (
            self._engine.pin_memory or self._device_ops is not None
        )
        return functools.partial(
            run_on_stream,
            ops,
            stream,
            device,
            plan.requests,
            batches,
            plan.batch_done,
            non_blocking=non_blocking,
        )


class BlockingAsyncStager(_StagerBase):
    """The simple stager: the whole copy runs in one worker thread, no stream.

    Args:
        cache_staged_state_dict: keep the staged buffers and refresh them in
            place on every call (one staged copy reused across calls).  When
            ``False`` every call allocates fresh buffers, so earlier results
            stay valid.
        type_check: refuse leaves that are not tensors, atomic values,
            dicts, lists or tuples, with a :class:`StagingError` naming them.
    """

    def __init__(self, cache_staged_state_dict: bool = False, type_check: bool = False) -> None:
        super().__init__()
        self.cache_staged_state_dict = cache_staged_state_dict
        self.type_check = type_check
        self._engine = StateDictStager()

    def cache_info(self) -> CacheInfo:
        """The staging storages kept for reuse (empty unless caching)."""
        return self._engine.cache_info()

    def _release_buffers(self) -> None:
        self._engine.close()

    async def _stage_locked(
        self, state_dict: Any, on_plan: Callable[[StagePlan], None] | None
    ) -> Any:
        engine = self._engine if self.cache_staged_state_dict else StateDictStager()
        staged = await run_sync(
            functools.partial(
                engine.stage,
                state_dict,
                type_check=self.type_check,
                # save(): refuse what a checkpoint cannot hold before copying.
                _refuse=None if on_plan is None else _refuse_mixed_dtypes,
            )
        )
        if on_plan is not None:
            # Everything has landed already: a plan with no copies lets save()
            # start its writer with nothing to wait for.
            on_plan(StagePlan(staged, [], []))
        return staged
