"""``persist``: write a state durably as a ``torch.save`` archive, off the loop.

The write is a short series of worker-thread steps (aiostage's background
threads, which run at a lower CPU priority, awaited through
:func:`aiostage._threads.run_background`, which never abandons a thread,
even on a plain ``Task.cancel()``):

1. pickle the state (metadata only) and plan every record's offset;
2. create the temp file next to the target, removing stale temps first;
3. write the pickle and metadata records in one go;
4. for each storage: await ``wait_ready(storage)``, then write its bytes in
   large chunks straight from the storage's memory (no copy).  A storage of
   at least :data:`DIRECT_MIN_BYTES` has its whole file blocks written with
   ``O_DIRECT`` (see *Direct I/O* below); small storages
   share one thread hop (at most ``MAX_BATCH_PIECES`` of them, so that the
   loop's per-batch work stays short; the batches are planned in a worker
   thread), and those of at most :data:`INLINE_MAX_BYTES` are checksummed
   by the writer and written with their local headers, a run in one write.
   Behind the writer (on more than two cores; on fewer, after the
   last write), one CRC thread folds each written chunk of the others into
   its record's CRC-32 and writes the record's local header once the record
   is complete;
5. ``fdatasync`` the data while the last CRCs finish, then build and write
   the trailing records and the central directory (which carry the CRCs) in
   a worker thread;
6. fsync (a few KiB are left dirty), close, ``os.replace`` over the target,
   fsync the directory.  A large file that was replaced is kept open across
   the rename and freed on a background thread after ``persist`` returns
   (see :mod:`aiostage._persist._atomic`); the next ``persist`` of the
   process waits for that first.

The event loop thread only schedules these steps and calls ``progress``.

Direct I/O: a buffered write copies every byte into the page cache, and the
kernel's writeback then flushes it: on the 2-core machine this was written
on, 1 GiB of buffered ``pwrite`` + ``fsync`` took 0.4-0.6 s of CPU time and
ran at 1.1-1.3 GB/s, the same bytes with ``O_DIRECT`` 0.02 s of CPU at
2.0-2.3 GB/s.  A checkpoint is rarely read back soon, so filling the page
cache with it only evicts the training job's own file data.  The writer
therefore opens a second descriptor of the temp file with ``O_DIRECT`` and
writes through it every whole 4 KiB block of a large storage (the archive
places such storages so that file offset and address agree modulo 4 KiB);
the partial blocks at either end, the headers and the small records go
through the ordinary descriptor.  The two never write the same page.  Where
the file system refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some network
and FUSE file systems) or refuses a write (an alignment it does not accept), everything
goes through the page cache instead; nothing else changes.  ``persist(...,
direct_io=False)`` or the environment variable ``AIOSTAGE_DIRECT_IO=0``
turns it off.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import errno as _errno
import os
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aiostage._exceptions import PersistError
from aiostage._gc import gc_paused
from aiostage._memory import release_free_memory
from aiostage._persist import _archive, _atomic
from aiostage._progress import Progress, check_progress
from aiostage._threads import BackgroundPool, GilTurns, free_all_in_blocks, run_background

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DIRECT_IO_ENV",
    "DIRECT_MIN_BYTES",
    "Progress",
    "WaitReady",
    "use_direct_io",
    "persist",
    "storage_view",
]

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
"""Bytes handed to one worker-thread write (and one CRC update).  Each
hand-off back to the loop cost it a late tick while the cores were busy:
with 32 MiB chunks the loop's p99 lag during a 1 GiB ``save()`` was
3.0-3.7 ms, with 64 MiB 1.5-1.9 ms (one run of five at 3.1), same time."""

MAX_BATCH_PIECES = 256
"""Most storages (pieces) handed to one worker-thread write.  The event loop
awaits ``wait_ready`` once per storage of a batch before the batch's thread
hop, so this bounds how long one loop step can take with many tiny tensors."""

DIRECT_MIN_BYTES = 512 * 1024
"""Storages at least this large are written with ``O_DIRECT`` where possible.
An ``O_DIRECT`` write waits for the device, so small ones are cheaper
through the page cache, which merges them.  512 MiB of equal storages on
the 2-core VM, direct vs page cache: 256 KiB each 0.9 vs 0.75-1.1 GB/s,
512 KiB 1.3 vs 0.9-1.0, 1 MiB 1.4-1.7 vs 1.2-1.4, 4 MiB 1.5-1.9 vs
0.5-0.9."""

DIRECT_IO_ENV = "AIOSTAGE_DIRECT_IO"
"""``0`` turns direct I/O off for every write whose ``direct_io`` is not given."""

WaitReady = Callable[[torch.UntypedStorage], Awaitable[None]]


INLINE_MAX_BYTES = 64 * 1024
"""Records at most this large are checksummed by the writer itself, and
written with their local headers: one write for a run of them, in place of
a write for each record's bytes and another for its header (once the CRC
thread had its CRC).  20,000 records of 4 KiB: 40,000 system calls, against
about 80."""


@dataclass(eq=False, slots=True)
class _Piece:
    """A slice ``[start, end)`` of one storage's bytes."""

    rec: _archive.StorageRecord
    start: int
    end: int
    inline: bool = False
    """The whole of a small record: checksummed and written with its local
    header by the writer (see :data:`INLINE_MAX_BYTES`), not by the CRC thread."""


def storage_view(storage: torch.UntypedStorage) -> memoryview:
    """A zero-copy byte view of a CPU storage's memory.

    The caller keeps ``storage`` alive for as long as the view is used.
    """
    nbytes = storage.nbytes()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_ubyte * nbytes).from_address(storage.data_ptr())
    return memoryview(array)


def _batches(
    storages: list[_archive.StorageRecord], chunk: int, max_pieces: int = MAX_BATCH_PIECES
) -> list[list[_Piece]]:
    """Split storages into thread-hop batches of at most ``chunk`` bytes and
    ``max_pieces`` pieces (built in a worker thread: one object per storage).

    A large storage is split into several pieces; consecutive small ones
    share a batch.  Every storage appears at least once, even empty ones.
    The piece cap bounds the work the event loop does per batch (one
    ``wait_ready`` per storage) between two thread hops.
    """
    batches: list[list[_Piece]] = []
    current: list[_Piece] = []
    filled = 0
    turn = GilTurns()
    for rec in storages:
        turn()
        start = 0
        while True:
            take = min(rec.nbytes - start, chunk - filled)
            inline = take == rec.nbytes <= INLINE_MAX_BYTES and not rec.direct
            current.append(_Piece(rec, start, start + take, inline))
            filled += take
            start += take
            if filled >= chunk or len(current) >= max_pieces:
                batches.append(current)
                current, filled = [], 0
            if start >= rec.nbytes:
                break
    if current:
        batches.append(current)
    return batches


def _crc_pieces(batch: list[_Piece]) -> None:
    """Fold each piece's bytes into its record's CRC-32, in order (but an
    inline piece's: the writer checksums those)."""
    for piece in batch:
        if piece.end > piece.start and not piece.inline:
            view = storage_view(piece.rec.storage)[piece.start : piece.end]
            piece.rec.crc = zlib.crc32(view, piece.rec.crc)


_crc_pool = BackgroundPool("aiostage-crc", workers=1)
"""One thread, shared: CRC jobs of a record run in submission order."""


#: With a spare core, CRCs run beside the writes; on one or two cores a third
#: busy thread only slows the writer and the event loop, so the CRCs wait for
#: the last write and overlap the data's fdatasync instead.  With direct I/O
#: the writer waits on the device without using a core (and the fdatasync is
#: short), so then each batch's CRC runs while that batch is written, on any
#: machine.
_CRC_BESIDE_WRITES = (os.cpu_count() or 1) > 2


def use_direct_io(requested: bool | None) -> bool:
    """Whether to use direct I/O: ``requested``, or when that is ``None`` the
    environment's :data:`DIRECT_IO_ENV` (default on).

    Raises:
        ValueError: the variable is set to something other than 0 or 1.
    """
    if requested is not None:
        return bool(requested)
    value = os.environ.get(DIRECT_IO_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{DIRECT_IO_ENV} must be 0 or 1, not {value!r}")
    return value == "1"


def _open_direct(fd: int) -> int | None:
    """A second, ``O_DIRECT`` descriptor of the file open as ``fd``, or
    ``None`` where the platform or the file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        # Through /proc: the very inode behind ``fd``, whatever its name now.
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError:  # EINVAL: not supported here; ENOENT: no /proc
        return None


def _write_direct(dfd: int, view: memoryview, offset: int) -> int:
    """``pwrite`` whole aligned blocks of ``view`` through ``dfd``; return how
    many bytes were written.  Fewer than all (possibly 0) when the file
    system refuses the write as misaligned (``EINVAL``) or a short write
    leaves an unaligned rest: the caller writes the rest through the page
    cache.  Any other error is raised."""
    done = 0
    while done < view.nbytes:
        try:
            n = os.pwrite(dfd, view[done:], offset + done)
        except OSError as exc:
            if exc.errno == _errno.EINVAL:
                return done
            raise
        done += n
        if n == 0 or n % _archive.DIRECT_ALIGN:
            return done
    return done


def _write_batch(fd: int, temp: _Temp, batch: list[_Piece]) -> None:
    """Write one batch of pieces' bytes (in a worker thread).  No CRC here.

    A piece of a ``direct`` record goes in up to three writes: the partial
    block at its start and at its end through ``fd`` (the page cache), the
    whole blocks between them through the ``O_DIRECT`` descriptor.
    """
    align = _archive.DIRECT_ALIGN
    run: list[_Piece] = []  # inline pieces that follow each other in the file
    for piece in batch:
        if piece.inline:
            rec = piece.rec
            if run and run[-1].rec.data_offset + run[-1].rec.nbytes != rec.header_offset:
                _write_inline(fd, run)
                run = []
            run.append(piece)
            continue
        if run:
            _write_inline(fd, run)
            run = []
        if piece.end <= piece.start:
            continue
        view = storage_view(piece.rec.storage)[piece.start : piece.end]
        at = piece.rec.data_offset + piece.start
        lo = -at % align
        hi = (at + view.nbytes) // align * align - at
        if temp.dfd is not None and piece.rec.direct and hi > lo:
            _atomic.write_all(fd, view[:lo], at)
            done = lo + _write_direct(temp.dfd, view[lo:hi], at + lo)
            if done < hi:  # refused: the rest of this file goes through the page cache
                temp.close_direct()
            _atomic.write_all(fd, view[done:], at + done)
        else:
            _atomic.write_all(fd, view, at)
    if run:
        _write_inline(fd, run)


def _write_inline(fd: int, run: list[_Piece]) -> None:
    """Checksum the records of ``run`` (whole, small, next to each other in
    the file) and write each one's local header and bytes, in one call.

    They are copied into one buffer first: a ``pwritev`` of a view per
    record kept hundreds of objects the cyclic collector tracks alive at
    once, which set off its collections (and then a full one, 150 ms).
    """
    out = bytearray()
    for piece in run:
        rec = piece.rec
        view = storage_view(rec.storage)
        rec.crc = zlib.crc32(view)
        out += _archive.local_header(rec)
        out += view
    _atomic.write_all(fd, out, run[0].rec.header_offset)


def _crc_batch(
    fd: int, batch: list[_Piece], finished: collections.deque[_archive.StorageRecord] | None = None
) -> None:
    """Fold a written batch into its records' CRC-32s; then the local header
    of each record this batch finishes (it carries the CRC) is written here,
    or, with ``finished``, left there for the writer to write.

    Runs on the CRC thread, behind the writer: the CRC of the data overlaps
    the writing of the next batches and the data's fdatasync.

    A header is a small write through the page cache, and ext4 holds the
    file's inode lock through each ``O_DIRECT`` write that extends it: a
    header written from this thread waited for the writer's direct write in
    flight.  The 200 headers of a 1 GiB save held the CRC thread for
    100-280 ms, and its CRCs finished 20-125 ms after the last write.  With
    direct writes the writer therefore writes the headers itself, between
    its own writes (:func:`_write_headers`).
    """
    _crc_pieces(batch)
    for piece in batch:
        if piece.end == piece.rec.nbytes and not piece.inline:
            if finished is None:
                _atomic.write_all(fd, _archive.local_header(piece.rec), piece.rec.header_offset)
            else:
                finished.append(piece.rec)


def _write_headers(fd: int, finished: collections.deque[_archive.StorageRecord]) -> None:
    """Write the local header of every record whose CRC is final so far."""
    while True:
        try:
            rec = finished.popleft()
        except IndexError:
            return
        _atomic.write_all(fd, _archive.local_header(rec), rec.header_offset)


def _write_headers_and_batch(
    fd: int,
    temp: _Temp,
    finished: collections.deque[_archive.StorageRecord],
    batch: list[_Piece],
) -> None:
    """One writer hop: the headers checksummed meanwhile, then ``batch``."""
    _write_headers(fd, finished)
    _write_batch(fd, temp, batch)


def _write_tail(
    fd: int,
    plan: _archive.ArchivePlan,
    finished: collections.deque[_archive.StorageRecord] | None = None,
) -> None:
    """Write the headers still in ``finished``, then build the trailing
    records and central directory (a few MB for many storages) and write
    them, in a worker thread."""
    if finished is not None:
        _write_headers(fd, finished)
    _atomic.write_all(fd, plan.tail_bytes(), plan.tail_offset)


def _wait_all(futures: list[concurrent.futures.Future[None]]) -> None:
    """Wait for every future, then raise the first error among them."""
    concurrent.futures.wait(futures)
    for future in futures:
        future.result()


def _prepare(obj: object, force_zip64: bool, direct: bool) -> _archive.ArchivePlan:
    try:
        pickled, storages, index = _archive.pickle_state(obj)
    except Exception as exc:
        raise _archive.StatePickleError(exc, _archive.locate_failure(obj)) from exc
    return _archive.plan_archive(
        pickled,
        storages,
        index,
        force_zip64=force_zip64,
        direct_min=DIRECT_MIN_BYTES if direct else None,
    )


_RELEASES: list[concurrent.futures.Future[None]] = []
_RELEASES_LOCK = threading.Lock()
_release_pool = BackgroundPool("aiostage-release", workers=1)
"""One thread, shared by every write, that frees replaced files."""


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _release(held: int | None) -> None:
    """Close ``held`` (a replaced checkpoint) on a background thread, after
    ``persist`` has returned: that frees the old file's blocks, which costs
    as much as a fifth of the write.  The next ``persist`` of this process
    waits for it first (:func:`_wait_releases`), so a disk that holds two
    checkpoints never sees three."""
    if held is None:
        return
    future = _release_pool().submit(_close_quietly, held)
    with _RELEASES_LOCK:
        _RELEASES[:] = [f for f in _RELEASES if not f.done()]
        _RELEASES.append(future)


def _wait_releases() -> None:
    """Wait until every replaced checkpoint released so far is freed."""
    with _RELEASES_LOCK:
        pending = list(_RELEASES)
    concurrent.futures.wait(pending)


def _forget_releases() -> None:
    """In a forked child: the parent's pending releases never run here (the
    child's copies of those descriptors close when it exits)."""
    global _RELEASES_LOCK
    _RELEASES.clear()
    _RELEASES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_releases)


def _check_parent(target: Path) -> None:
    parent = target.parent
    if not parent.exists():
        raise FileNotFoundError(_errno.ENOENT, "parent directory does not exist", str(parent))
    if not parent.is_dir():
        raise NotADirectoryError(_errno.ENOTDIR, "parent is not a directory", str(parent))
    if target.is_dir():
        raise IsADirectoryError(_errno.EISDIR, "target is a directory", str(target))


@dataclass(eq=False)
class _Temp:
    """The temp file of one write, as far as it exists (updated by worker threads)."""

    path: Path | None = None
    fd: int | None = None
    dfd: int | None = None
    """The ``O_DIRECT`` descriptor of the temp file, while it is used."""
    held: int | None = None
    """The file this write replaced, kept open past the rename."""

    def open(self, target: Path, direct: bool) -> int:
        _check_parent(target)
        _atomic.remove_stale_temps(target)
        self.path, self.fd = _atomic.create_temp(target)
        if direct:
            self.dfd = _open_direct(self.fd)
        return self.fd

    def close_direct(self) -> None:
        dfd, self.dfd = self.dfd, None
        if dfd is not None:
            os.close(dfd)

    def close(self) -> None:
        self.close_direct()
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def commit(self, target: Path) -> None:
        """Rename over ``target``; from then on there is no temp file to remove.

        The replaced file, if large, stays open as ``held`` (see
        :func:`_atomic.hold_replaced`) until :meth:`release`.
        """
        assert self.path is not None and self.fd is None
        self.held = _atomic.hold_replaced(target)
        os.replace(self.path, target)
        _atomic.forget_temp(self.path)
        self.path = None

    def release(self) -> None:
        """Let the replaced file go (freed on a background thread)."""
        held, self.held = self.held, None
        _release(held)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.close_direct()
        _atomic.discard(self.fd, self.path)
        self.fd = self.path = None


async def persist(
    obj: object,
    path: str | os.PathLike[str],
    *,
    wait_ready: WaitReady | None = None,
    progress: Progress | None = None,
    direct_io: bool | None = None,
    _chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    _force_zip64: bool = False,
) -> Path:
    """Write ``obj`` to ``path`` durably and atomically; return the path.

    The file is a standard ``torch.save`` zip archive: ``torch.load(path,
    weights_only=True)``, ``torch.load(path, mmap=True)`` and
    :func:`aiostage.load` all read it, with storage sharing between views
    preserved.  ``obj`` may be any picklable structure (dicts, lists, tuples,
    dataclasses, ...) whose tensors are strided CPU tensors.

    The bytes go to a temp file in the same directory, which is fsynced and
    renamed over ``path``; the directory is then fsynced.  At every instant
    ``path`` holds the previous complete checkpoint or the new complete one.
    Stale temp files of ``path`` left by killed processes are removed first.
    A large file that ``path`` held before is freed on a background thread
    once the new one is in place (freeing 1 GiB took ext4 0.2 s); the next
    ``persist`` of this process waits for that before it writes.
    Runs on an asyncio event loop (plain asyncio or anyio's asyncio backend).

    One writer per target path: do not persist to the same ``path`` from two
    hosts (or two containers with their own pid namespaces) at once, e.g.
    on a shared file system.  A temp file counts as stale when the process
    whose pid is in its name is gone, and that is checked on the local host
    only, so another host's write in progress could be removed from under
    it.  Concurrent writes to one path from processes of one host are safe:
    each file is complete and the last rename wins.

    Args:
        obj: the state to write.
        path: the checkpoint file; its directory must exist.
        wait_ready: if given, awaited as ``wait_ready(storage)`` (``storage``
            being ``tensor.untyped_storage()``) before that storage's bytes
            are read, so that a stager can persist each storage as soon as
            its copy has landed.  The pickle is written first; it needs only
            metadata.
        progress: if given, called on the event-loop thread as
            ``progress(bytes_done, bytes_total)`` after each chunk; the total
            is the pickle plus every storage's bytes.  A plain function: an
            ``async def`` one is refused with ``TypeError``.
        direct_io: write the bulk of each storage of at least
            :data:`DIRECT_MIN_BYTES` with ``O_DIRECT``, past the page cache
            (faster, far less CPU, and the checkpoint does not evict the
            job's cached files), where the file system allows it; elsewhere
            it falls back to the page cache by itself.  ``False`` writes
            everything through the page cache (a file to be read back at
            once then loads from memory).  Default: on, unless the
            environment sets ``AIOSTAGE_DIRECT_IO=0``.  The storages must not
            be resized or reallocated while ``persist`` runs.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        PersistError: pickling or any file operation failed; ``errno``
            carries the OS error number (``ENOSPC``, ``EFBIG``, ...).  The
            temp file is removed and the previous checkpoint is untouched.
            An exception raised by ``wait_ready`` or ``progress`` propagates
            unchanged, with the same cleanup.
        TypeError: ``progress`` is not a plain callable (checked before
            anything is written).
        ValueError: ``AIOSTAGE_DIRECT_IO`` is set to something other than
            ``0`` or ``1`` (checked before anything is written).

    Cancellation:
        No further I/O is issued; the chunk being written by a worker thread
        is waited for, the temp file is removed (finished even if cancelled
        again) and the previous checkpoint is left in place.  The
        cancellation is then re-raised as is.  A cancellation that arrives
        while the finished file is being renamed into place lets the rename
        complete, so ``path`` may hold the new checkpoint.
    """
    check_progress(progress)
    direct = use_direct_io(direct_io)
    target = Path(os.fspath(path))
    step = "pickling the state"
    temp = _Temp()
    crcs: list[concurrent.futures.Future[None]] = []
    deferred: list[list[_Piece]] = []
    # Records checksummed by the CRC thread whose headers the writer writes.
    finished: collections.deque[_archive.StorageRecord] = collections.deque()
    try:
        with gc_paused():  # pickling makes an object or more per tensor (see aiostage._gc)
            plan = await run_background(_prepare, obj, _force_zip64, direct)
        # A checkpoint replaced by an earlier write is freed by now.
        await run_background(_wait_releases)
        total = plan.payload_bytes
        step = "creating the temp file"
        fd = await run_background(temp.open, target, direct)
        step = "writing the checkpoint"
        await run_background(_atomic.write_all, fd, plan.head, 0)
        done = len(plan.head_records[0].data)
        if progress is not None:
            progress(done, total)
        with gc_paused():  # (a piece object per storage)
            batches = await run_background(_batches, plan.storages, max(1, _chunk_bytes))
        for batch in batches:
            if wait_ready is not None:
                for piece in batch:
                    if piece.start == 0:
                        await wait_ready(piece.rec.storage)
            if temp.dfd is not None:
                # The batch has landed: checksum it while the device writes it
                # (the writer writes the headers: see _crc_batch).
                crcs.append(_crc_pool().submit(_crc_batch, fd, batch, finished))
                await run_background(_write_headers_and_batch, fd, temp, finished, batch)
            else:
                await run_background(_write_batch, fd, temp, batch)
                if _CRC_BESIDE_WRITES:
                    crcs.append(_crc_pool().submit(_crc_batch, fd, batch))
                else:
                    deferred.append(batch)
            done += sum(p.end - p.start for p in batch)
            if progress is not None:
                progress(done, total)
        crcs.extend(_crc_pool().submit(_crc_batch, fd, batch) for batch in deferred)
        # The data goes to disk while the last CRCs (and their local headers)
        # finish; then the central directory, and a final short fsync.
        step = "flushing the checkpoint to disk (fsync)"
        await run_background(os.fdatasync, fd)
        step = "checksumming the checkpoint"
        await run_background(_wait_all, crcs)
        step = "writing the checkpoint"
        await run_background(_write_tail, fd, plan, finished)
        step = "flushing the checkpoint to disk (fsync)"
        await run_background(os.fsync, fd)
        step = "closing the temp file"
        await run_background(temp.close)
        step = "renaming the temp file over the checkpoint"
        await run_background(temp.commit, target)
        step = "flushing the directory (fsync); the new checkpoint is in place"
        await run_background(_atomic.fsync_dir, target.parent)
        temp.release()
        # Free the write's object per storage and per piece off the loop.
        await run_background(free_all_in_blocks, *batches, batches, plan.storages)
        # Hand back the heap memory this save freed (see aiostage._memory).
        await run_background(release_free_memory)
    except BaseException as exc:
        temp.release()  # the rename may have happened (cancelled during commit)

        def cleanup() -> None:
            # The CRC thread reads the storages and writes through the fd:
            # let it finish before the fd is closed and the caller returns.
            concurrent.futures.wait(crcs)
            temp.discard()

        if crcs or temp.fd is not None or temp.path is not None:
            # run_background finishes the cleanup even if cancelled again meanwhile.
            await run_background(cleanup)
        if isinstance(exc, OSError):
            raise PersistError(
                f"{step} failed ({exc.strerror or exc})", path=target, errno=exc.errno
            ) from exc
        if isinstance(exc, _archive.StatePickleError):
            cause = exc.cause
            detail = str(cause) if isinstance(cause, _archive.StateLayoutError) else repr(cause)
            errno = cause.errno if isinstance(cause, OSError) else None
            raise PersistError(
                f"{step} failed: {detail}", path=target, errno=errno, key=exc.key
            ) from cause
        if isinstance(exc, Exception) and step == "pickling the state":  # (laying it out)
            raise PersistError(f"{step} failed: {exc!r}", path=target) from exc
        raise
    return target
