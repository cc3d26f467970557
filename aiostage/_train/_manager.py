"""``CheckpointManager``: periodic async checkpoints of a training loop, crash-safe.

One save at a time: ``await save(step, state)`` first waits for the previous
save's background persist and commit (it does not coalesce: every save you
issue is written), then stages ``state`` and returns; the write and the
commit go on in a background task.  Training therefore stalls only while
staging, plus whatever remains of the previous save when saves are issued
faster than they persist.

Commit protocol for one step (see :mod:`aiostage._train._manifest` for the
layout):

1. every rank writes ``step_<n>/rank_<r>.<attempt>.pt`` with
   :func:`aiostage.persist` (temp file, fsync, rename, directory fsync);
2. with several ranks, an ``all_gather`` of (success, file name, size) on a
   worker thread;
3. rank 0, if every rank succeeded: fsync the checkpoint directory (the
   step directory's entry), check every listed file, write ``manifest.json``
   atomically -- the commit point -- then rotate (delete the steps beyond
   the ``keep_last`` most recently committed, manifest first) and remove
   leftovers of interrupted saves (step directories without a manifest);
4. with several ranks, a ``broadcast`` of rank 0's verdict, so that every
   rank's save fails or succeeds together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiostage._exceptions import CheckpointManagerError, PersistError
from aiostage._load._reader import MapLocation, SafeGlobal, load
from aiostage._persist._atomic import fsync_dir
from aiostage._progress import Progress
from aiostage._threads import run_sync, uncancelled
from aiostage._train import _manifest as mf

if TYPE_CHECKING:
    import torch.distributed as dist

    from aiostage._persist._handle import SaveHandle

__all__ = ["CheckpointManager", "SaveStats"]

logger = logging.getLogger("aiostage.train")


class _Saver(Protocol):
    async def save(
        self, state_dict: Any, path: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> SaveHandle: ...

    async def close(self) -> None: ...


@dataclass
class SaveStats:
    """Timings of one :meth:`CheckpointManager.save` (this rank's view).

    ``waited_s`` and ``stage_s`` are known when ``save`` returns; the rest
    are filled in when the background persist and commit finish.
    """

    step: int
    waited_s: float = 0.0
    """Time ``save`` waited for the previous save to finish."""
    stage_s: float = 0.0
    """Time to stage the state (the rest of the time ``save`` blocked)."""
    persist_s: float | None = None
    """From staged to this rank's file being durable (the background write)."""
    commit_s: float | None = None
    """From the file being durable to the step being committed (collectives,
    manifest, rotation)."""
    nbytes: int | None = None
    """Size of this rank's file."""
    committed: bool = False

    @property
    def blocked_s(self) -> float:
        """How long the training loop was blocked in ``save``."""
        return self.waited_s + self.stage_s

    @property
    def throughput_bps(self) -> float | None:
        """Bytes per second from the start of staging to the file being durable."""
        if self.nbytes is None or self.persist_s is None:
            return None
        span = self.stage_s + self.persist_s
        return self.nbytes / span if span > 0 else None


def _default_group() -> Any:
    """A dedicated gloo group over the default world, or ``None`` for one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


class CheckpointManager:
    """Periodic asynchronous checkpoints in a directory, crash-safe, with rotation.

    Usage::

        async with CheckpointManager(run_dir, keep_last=3) as mgr:
            if await mgr.complete_steps():
                set_state(model, opt, await mgr.restore())
            for step in range(start, n):
                train_step()
                if step % 100 == 0:
                    await mgr.save(step, get_state(model, opt, extra={"step": step}))

    Args:
        directory: where checkpoints go (created if missing).  With several
            ranks it must be the same shared directory on every rank.
        keep_last: how many complete checkpoints to keep: the most
            recently *committed* ones (see :meth:`steps`); the others are
            deleted only after a newer one is committed.
        stager: the stager to stage and write with; by default a
            :class:`~aiostage.DefaultStager` owned (and closed) by the
            manager.  A stager you pass is not closed.
        process_group: for several processes, the group whose ranks each
            write their own file per step.  Its collectives run on a worker
            thread, concurrently with your training, so it must be used by
            nothing else (e.g. ``dist.new_group(backend="gloo")``); sharing
            the group your model's DDP uses could misorder collectives.  When
            ``None`` and ``torch.distributed`` is initialized with more than
            one rank, the manager creates such a group itself (a collective:
            every rank must construct its manager at the same point).
        history_len: how many :class:`SaveStats` :attr:`history` keeps.

    With several ranks, call ``save``, ``restore``, ``wait`` and ``close``
    on every rank in the same order, and cancel on every rank: a rank that
    stops taking part leaves the others blocked in a collective until the
    group's timeout.

    Saves do not coalesce: a ``save`` issued while the previous one is still
    persisting waits for it.  An error of a background save is raised by the
    next :meth:`save`, :meth:`wait` or :meth:`close` (once).  aiostage logs
    through the ``aiostage.train`` logger and never prints.

    The first ``save`` takes the directory's writer lock (an exclusive
    ``flock`` on ``.aiostage.lock``, on rank 0) until :meth:`close`: a second
    manager -- say a previous run that is still alive -- cannot commit into
    or clean the same directory meanwhile; its ``save`` raises
    :class:`CheckpointManagerError`.  :meth:`steps` and :meth:`restore` need
    no lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int = 3,
        stager: _Saver | None = None,
        process_group: dist.ProcessGroup | None = None,
        *,
        history_len: int = 1000,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if history_len < 1:
            raise ValueError(f"history_len must be at least 1, got {history_len}")
        self.directory = Path(os.fspath(directory))
        self.keep_last = keep_last
        self._own_stager = stager is None
        if stager is None:
            from aiostage._stage._stagers import DefaultStager

            stager = DefaultStager()
        self._stager: _Saver = stager
        self._group = process_group if process_group is not None else _default_group()
        if self._group is not None:
            import torch.distributed as dist

            self.rank = dist.get_rank(self._group)
            self.world_size = dist.get_world_size(self._group)
        else:
            self.rank, self.world_size = 0, 1
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Task[None] | None = None
        self._closed = False
        self._closing = False
        self._dir_lock: int | None = None
        self._lock_checked = False
        self._sequence = 0  # the last commit sequence number this manager wrote
        self.history_len = history_len
        self.history: list[SaveStats] = []
        """Stats of the last ``history_len`` saves that were staged, oldest first."""

    # -- queries -------------------------------------------------------------

    def steps(self) -> list[int]:
        """The steps with a complete checkpoint, in commit order: the last is the latest.

        Steps are ordered by when they were committed, not by number: if
        you save step 100 again after step 200 (a run rolled back to 100),
        the list ends ``[..., 200, 100]`` and :meth:`restore` loads step 100.
        With increasing step numbers the order is ascending.

        A step is listed only once its manifest is durable and every rank
        file it names is present; leftovers of interrupted saves are not.
        A step whose manifest cannot be read (an I/O error such as EIO or
        EMFILE) is not listed either, and a warning is logged.  Blocking
        (a directory listing and one small read per step, quick on a local
        disk): from a coroutine, prefer :meth:`complete_steps`.

        Raises:
            OSError: the directory cannot be listed.
        """
        found = mf.scan(self.directory)
        for sdir, exc in found.unreadable:
            logger.warning("cannot tell whether %s is complete (not listed): %s", sdir, exc)
        return [step for step, _dir, _m in found.complete]

    async def complete_steps(self) -> list[int]:
        """:meth:`steps`, in a worker thread so that the event loop keeps running.

        Cancellation: the scan (read-only) finishes in its thread; nothing
        is changed.
        """
        return await run_sync(self.steps)

    # -- saving --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise CheckpointManagerError(f"the CheckpointManager of {self.directory} is closed")

    async def save(self, step: int, state: Any, *, progress: Progress | None = None) -> SaveStats:
        """Stage ``state`` as the checkpoint of ``step``; persist it in the background.

        Waits first for the previous save to finish (persist and commit).
        Returns once ``state`` is staged: training may modify it again.  The
        step becomes visible in :meth:`steps` only when every rank's file is
        durable and the manifest is committed.  With several ranks every
        rank must call ``save`` for the same steps in the same order.

        Args:
            step: the step number (``>= 0``); saving a step again replaces
                it atomically.  Steps need not increase: each commit becomes
                the latest (see :meth:`steps`), so after rolling a run back
                to an older step, saving it again makes it the one that
                :meth:`restore` loads and rotation keeps.
            state: what to save, e.g. :func:`aiostage.get_state`'s result.
            progress: called on the event loop as ``progress(bytes_done,
                bytes_total)`` while this rank's file is written.

        Returns:
            This save's :class:`SaveStats`; its persist and commit fields are
            filled in once the background work finishes.

        Raises:
            PersistError, CheckpointManagerError: the *previous* save failed
                (this one was not started), or the step directory cannot be
                created.
            StagingError: ``state`` cannot be staged (nothing is written).
            CheckpointManagerError: the manager is closed.

        Cancellation:
            While waiting for the previous save, that save goes on and
            nothing new starts.  While staging, the write is stopped and its
            temp file removed; the previous checkpoints are untouched.  Once
            ``save`` has returned, cancel the background work with
            :meth:`close` being cancelled or by leaving ``async with`` through
            a cancellation.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._check_open()
        stats = SaveStats(step)
        start = time.perf_counter()
        async with self._lock:
            self._check_open()
            await self._settle(raise_error=True)
            self._check_open()  # close() was cancelled meanwhile
            if not self._lock_checked:
                await self._take_directory_lock()
            stats.waited_s = time.perf_counter() - start
            begin = time.perf_counter()
            attempt = secrets.token_hex(8)
            sdir = mf.step_dir(self.directory, step)
            name = mf.rank_file_name(self.rank, attempt)
            handle: SaveHandle | None = None
            try:
                await run_sync(_make_step_dir, sdir)
                handle = await self._stager.save(state, sdir / name, progress=progress)
            except Exception:
                if self._group is not None:
                    # The other ranks are about to wait for this one's report.
                    self._inflight = asyncio.create_task(
                        self._complete(stats, attempt, sdir, name, None, time.perf_counter())
                    )
                raise
            staged = time.perf_counter()
            stats.stage_s = staged - begin
            self.history.append(stats)
            if len(self.history) > self.history_len:
                del self.history[: len(self.history) - self.history_len]
            self._inflight = asyncio.create_task(
                self._complete(stats, attempt, sdir, name, handle, staged),
                name=f"aiostage-checkpoint-step-{step}",
            )
        return stats

    async def _take_directory_lock(self) -> None:
        """Rank 0 takes the writer lock; with several ranks all learn whether it did."""
        error: str | None = None
        if self.rank == 0:
            try:
                self._dir_lock = await run_sync(_lock_directory, self.directory)
            except (CheckpointManagerError, OSError) as exc:
                error = str(exc)
        if self._group is not None:
            error = await self._broadcast(error)
        if error is not None:
            raise CheckpointManagerError(error)
        self._lock_checked = True

    async def _complete(
        self,
        stats: SaveStats,
        attempt: str,
        sdir: Path,
        name: str,
        handle: SaveHandle | None,
        staged: float,
    ) -> None:
        """Background part of a save: wait for the file, agree, commit, rotate.

        ``handle`` is ``None`` when this rank's save failed before writing
        (its error was raised by ``save``): the rank then only reports the
        failure to the others.
        """
        local_error: Exception | None = None
        if handle is None:
            await self._report_failure(name)
            return
        try:
            path = await handle.wait()
            stats.nbytes = (await run_sync(os.stat, path)).st_size
        except asyncio.CancelledError:
            handle.cancel()
            with contextlib.suppress(BaseException):
                await uncancelled(handle.wait())
            raise
        except Exception as exc:
            local_error = exc
        durable = time.perf_counter()
        stats.persist_s = durable - staged
        report = (local_error is None, name, stats.nbytes or 0, repr(local_error))
        reports = [report] if self._group is None else await self._all_gather(report)
        verdict: str | None = None
        commit_error: Exception | None = None
        if self.rank == 0:
            failed = [f"rank {r}: {rep[3]}" for r, rep in enumerate(reports) if not rep[0]]
            if failed:
                verdict = "; ".join(failed)
            else:
                manifest = mf.Manifest(
                    stats.step,
                    attempt,
                    tuple(rep[1] for rep in reports),
                    tuple(rep[2] for rep in reports),
                )
                try:
                    await run_sync(self._commit, sdir, manifest)
                except Exception as exc:
                    commit_error = exc
                    verdict = f"rank 0 could not write the manifest: {exc}"
        if self._group is not None:
            verdict = await self._broadcast(verdict)
        if local_error is not None:
            raise local_error
        if commit_error is not None:
            if isinstance(commit_error, OSError):
                raise PersistError(
                    f"committing step {stats.step} failed",
                    path=sdir / mf.MANIFEST,
                    errno=commit_error.errno,
                ) from commit_error
            raise commit_error
        if verdict is not None:
            raise CheckpointManagerError(f"step {stats.step} was not committed: {verdict}")
        stats.commit_s = time.perf_counter() - durable
        stats.committed = True
        logger.info(
            "checkpoint step %d committed in %s (%d bytes on rank %d)",
            stats.step,
            sdir,
            stats.nbytes or 0,
            self.rank,
        )

    async def _report_failure(self, name: str) -> None:
        """Take part in a step's collectives as a rank whose save failed up front."""
        why = f"rank {self.rank} could not stage or start its write"
        await self._all_gather((False, name, 0, why))
        await self._broadcast(why if self.rank == 0 else None)

    def _commit(self, sdir: Path, manifest: mf.Manifest) -> None:
        """Rank 0, worker thread: check the rank files, write the manifest, rotate."""
        for fname, size in zip(manifest.files, manifest.sizes, strict=True):
            actual = os.stat(sdir / fname).st_size
            if actual != size:
                raise CheckpointManagerError(
                    f"{sdir / fname} has {actual} bytes, its rank reported {size}"
                )
        found: mf.Scan | None
        try:
            found = mf.scan(self.directory)
        except OSError as exc:
            found = None
            logger.warning("cannot list %s (no cleaning this time): %s", self.directory, exc)
        # Strictly after every commit readable now and every one this manager
        # made; the wall clock covers manifests that cannot be read just now.
        known = [m.sequence for _s, _d, m in found.complete] if found is not None else []
        sequence = max(self._sequence + 1, *(q + 1 for q in known), time.time_ns())
        manifest = replace(manifest, sequence=sequence, committed_at=time.time())
        fsync_dir(self.directory)
        mf.write_manifest(sdir, manifest)
        self._sequence = sequence
        if found is None:
            return
        try:
            self._cleanup(found, sdir, manifest)
        except OSError as exc:  # the step is committed; cleaning is best effort
            logger.warning(
                "cleaning %s after step %d failed: %s", self.directory, manifest.step, exc
            )

    def _cleanup(self, found: mf.Scan, committed_dir: Path, committed: mf.Manifest) -> None:
        """Rotate beyond ``keep_last`` and remove leftovers of interrupted saves.

        ``found`` is the directory as scanned just before ``committed`` was
        written.  Runs on rank 0 while every rank waits in the verdict
        broadcast, so no rank is writing into the directory.  Only what is
        known for sure is deleted: the oldest committed steps beyond
        ``keep_last`` (manifest first) and step directories without a
        manifest.  The step just committed, steps whose manifest cannot be
        read (their state is unknown) and steps with an invalid manifest are
        never deleted here.
        """
        older = [item for item in found.complete if item[1] != committed_dir]
        keep = older[max(0, len(older) - (self.keep_last - 1)) :] if self.keep_last > 1 else []
        kept_dirs = {sdir for _s, sdir, _m in keep}
        for step, sdir, manifest in older:
            if sdir in kept_dirs:
                removed = mf.remove_unlisted(sdir, manifest)
                if removed:
                    logger.info("removed leftovers in %s: %s", sdir, removed)
            else:
                logger.info("deleting checkpoint step %d (keep_last=%d)", step, self.keep_last)
                mf.remove_step(sdir)
        removed = mf.remove_unlisted(committed_dir, committed)
        if removed:
            logger.info("removed leftovers in %s: %s", committed_dir, removed)
        for sdir in found.incomplete:
            if sdir != committed_dir and mf.remove_leftover(sdir):
                logger.info("removed interrupted checkpoint %s", sdir)
        for sdir in found.invalid:
            if sdir != committed_dir:
                logger.warning("%s has an invalid manifest: not listed, not removed", sdir)
        for sdir, exc in found.unreadable:
            if sdir != committed_dir:
                logger.warning("cannot tell whether %s is complete (kept): %s", sdir, exc)

    async def _all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        def gather() -> list[Any]:
            out: list[Any] = [None] * self.world_size
            dist.all_gather_object(out, obj, group=self._group)
            return out

        return await run_sync(gather)

    async def _broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        def broadcast() -> Any:
            box = [obj]
            dist.broadcast_object_list(box, group=self._group, group_src=0)
            return box[0]

        return await run_sync(broadcast)

    async def _settle(self, *, raise_error: bool) -> None:
        """Wait for the in-flight save (lock held); raise its error once if asked."""
        task = self._inflight
        if task is None:
            return
        await asyncio.wait([task])
        if not raise_error:
            return
        self._inflight = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            raise exc

    async def wait(self) -> None:
        """Wait until every save issued so far is committed (durable).

        Raises:
            PersistError, CheckpointManagerError: a background save failed
                (raised once; the previous checkpoints are intact).

        Cancellation:
            Only the waiting stops; the background save goes on.
        """
        async with self._lock:
            await self._settle(raise_error=True)

    # -- restoring -----------------------------------------------------------

    async def restore(
        self,
        step: int | None = None,
        *,
        map_location: MapLocation = "cpu",
        mmap: bool = False,
        into: Any = None,
        verify: bool = False,
        safe_globals: Sequence[SafeGlobal] | None = None,
        progress: Progress | None = None,
    ) -> Any:
        """Load this rank's state of ``step``, or of the latest complete step.

        The latest step is the one committed last (the last of
        :meth:`steps`), not the highest number.

        A save of this manager still in flight is waited for first (its
        error, if any, is left for the next :meth:`save`, :meth:`wait` or
        :meth:`close`), so the latest step includes every save issued so
        far that succeeded.  With several ranks, every rank must call
        ``restore``; rank 0 picks the latest step for all of them.
        The keyword arguments go to :func:`aiostage.load` (``progress``
        reports bytes read; ``into`` reads the checkpoint straight into
        existing tensors, e.g. ``into={"model": model.state_dict()}`` when
        the saved state had that shape).

        Raises:
            CheckpointManagerError: no complete checkpoint (of that step), or
                it was written by a different number of ranks; or, with
                ``step=None``, the manifest of some step could not be read
                (an I/O error: which step is the latest is unknown, so none
                is picked); or the manifest of ``step`` could not be read.
            CheckpointLoadError: the rank file cannot be read.

        Cancellation:
            The read stops between chunks; nothing is left open and no
            checkpoint is changed.
        """
        async with self._lock:
            await self._settle(raise_error=False)
            if step is None:
                chosen: tuple[int | None, str | None] = (None, None)
                if self.rank == 0:
                    chosen = await run_sync(self._latest)
                if self._group is not None:
                    chosen = await self._broadcast(chosen)
                latest, error = chosen
                if latest is None:
                    raise CheckpointManagerError(
                        error or f"no complete checkpoint in {self.directory}"
                    )
                step = latest
            sdir = mf.step_dir(self.directory, step)
            try:
                manifest = await mf.read_manifest_async(sdir, step)
            except OSError as exc:
                raise CheckpointManagerError(
                    f"cannot read the manifest of step {step} in {self.directory}: {exc}"
                ) from exc
        if manifest is None:
            raise CheckpointManagerError(
                f"no complete checkpoint of step {step} in {self.directory}"
            )
        if manifest.world_size != self.world_size:
            raise CheckpointManagerError(
                f"step {step} was saved by {manifest.world_size} ranks, "
                f"this group has {self.world_size}"
            )
        return await load(
            sdir / manifest.files[self.rank],
            map_location=map_location,
            mmap=mmap,
            into=into,
            verify=verify,
            safe_globals=safe_globals,
            progress=progress,
        )

    def _latest(self) -> tuple[int | None, str | None]:
        """Rank 0, worker thread: (the latest complete step, or None and why)."""
        try:
            found = mf.scan(self.directory)
        except OSError as exc:
            return None, f"cannot list {self.directory}: {exc}"
        if found.unreadable:
            sdir, error = found.unreadable[0]
            return None, (
                f"cannot tell which checkpoint in {self.directory} is the latest: "
                f"reading {sdir / mf.MANIFEST} failed ({error}); retry, or pass the step"
            )
        if not found.complete:
            return None, None
        return found.complete[-1][0], None

    # -- closing -------------------------------------------------------------

    async def close(self) -> None:
        """Wait for the in-flight save, then close the stager (if the manager made it).

        Idempotent.

        Raises:
            PersistError, CheckpointManagerError: the last background save
                failed (after closing).

        Cancellation:
            The in-flight save is cancelled (its temp file is removed, the
            previous checkpoints stay); if a ``save``, ``wait`` or
            ``restore`` holds the manager, close waits for it to let go and
            cancels whatever save it started, so nothing commits or rotates
            once the directory lock is released.  Then the stager is closed
            and the cancellation is re-raised.
        """
        if self._closed:
            return
        self._closing = True  # saves not yet holding the lock are refused
        try:
            try:
                async with self._lock:
                    await self._settle(raise_error=True)
            except asyncio.CancelledError:
                # Cancelled while settling or while waiting for the lock (a
                # save, wait or restore holds it): stop the save in flight,
                # and whatever the holder starts, before the directory lock
                # goes -- nothing may commit or rotate without it.
                await uncancelled(self._abort())
                raise
        finally:
            self._closed = True
            self._closing = False
            self._lock_checked = False
            lock, self._dir_lock = self._dir_lock, None
            if lock is not None:
                os.close(lock)  # releases the flock
            if self._own_stager:
                await self._stager.close()  # itself finishes despite cancellation

    async def _abort(self) -> None:
        """Cancel the save in flight, wait for the lock's holder, cancel again."""
        await self._cancel_inflight()
        async with self._lock:
            # A save that held the lock may have started a new background
            # task meanwhile (a save past its _check_open was staging).
            await self._cancel_inflight()

    async def _cancel_inflight(self) -> None:
        task, self._inflight = self._inflight, None
        if task is None:
            return
        task.cancel()
        await uncancelled(asyncio.wait([task]))
        if not task.cancelled() and task.exception() is not None:
            logger.warning("checkpoint save failed while being cancelled: %s", task.exception())

    async def __aenter__(self) -> CheckpointManager:
        """Return the manager.

        Cancellation: nothing to cancel; nothing is started.
        """
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        """Leave normally: :meth:`close` (waits, raises a background error).

        Leaving through a cancellation: the in-flight save is cancelled
        cleanly.  Leaving through another exception: the in-flight save is
        finished; its error, if any, is logged so that yours propagates.

        Cancellation: see :meth:`close`.
        """
        if exc_type is None:
            await self.close()
            return

        async def unwind() -> None:
            if issubclass(exc_type, asyncio.CancelledError):
                await self._cancel_inflight()
            else:
                task = self._inflight
                if task is not None:
                    await asyncio.wait([task])
                    self._inflight = None
                    if not task.cancelled() and task.exception() is not None:
                        logger.error("checkpoint save failed: %s", task.exception())
            await self.close()

        await uncancelled(unwind())


def _make_step_dir(sdir: Path) -> None:
    try:
        sdir.mkdir(exist_ok=True)
    except OSError as exc:
        raise PersistError(
            f"cannot create the step directory ({exc.strerror or exc})",
            path=sdir,
            errno=exc.errno,
        ) from exc


LOCK_NAME = ".aiostage.lock"


def _lock_directory(directory: Path) -> int:
    """Take the writer lock of ``directory`` (an exclusive ``flock``); return its fd.

    Only one manager at a time may write (save, rotate, clean) a checkpoint
    directory: a stale one -- a previous run that has not died yet -- would
    otherwise commit its saves and delete the new run's files in progress
    as leftovers.  The kernel drops the lock when its holder dies, so a
    crashed run never blocks the next one.
    """
    import fcntl

    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CheckpointManagerError(
            f"{directory} is being written by another CheckpointManager (pid {holder});"
            " close it (or let that process exit) first"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
