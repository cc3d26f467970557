"""Read a checkpoint's storage records in parallel, then rebuild its state.

``torch.load`` reads one record at a time into memory that is faulted in as
the bytes arrive, and reads data while it unpickles.  This path reads every
``data/<key>`` record first, with ``preadv`` from worker threads into their
final memory (adjacent small records coalesced into one batch, large ones
cut into batches so that threads can share them and a cancellation stops
between them), and only then runs torch's own weights-only unpickler on
``data.pkl``, handing it the storages already read.  The rules of what may
be unpickled are torch's, unchanged; every storage holds its bytes before
any tensor is rebuilt from it.

It applies to CPU loads of little-endian archives (what aiostage and
``torch.save`` write on every machine torch supports); for anything else
:func:`check_byteorder` or :func:`archive_prefix` raise :class:`Unsupported`
and ``aiostage.load`` goes through ``torch.load``.

Direct reads: when the page cache holds less than half of the file, the
records of :data:`DIRECT_MIN_BYTES` or more that are not in the page cache
are read with ``O_DIRECT`` (:class:`DirectReads`): before each window
(:data:`DIRECT_SYSCALL_BYTES` or :data:`BOUNCE_BYTES`), ``cachestat`` (Linux
6.5+) tells how much of it the page cache holds, and a window it mostly
holds, or holds dirty, is read from the cache.  (A ``preadv`` with
``RWF_NOWAIT`` would tell too, but its miss starts the readahead it declines
to wait for: the file was then read twice, through both paths.)  Where a
record's destination memory and its file offset agree modulo
:data:`~aiostage._persist._archive.DIRECT_ALIGN`, its whole blocks are read
straight into that memory; elsewhere (tensors lie where the allocator put
them) they go through a bounce buffer and are copied out. ``aiostage.load``
reads so into existing tensors (``into``) only.  A cold buffered read on the
2-core VM went at 0.6-2.0 GB/s with 0.2-1.5 s of CPU per GiB (page-cache
allocation, reclaim, the copy), an ``O_DIRECT`` read of the same file at the
device's 1.4-2.3 GB/s with 0.03 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from aiostage._exceptions import CheckpointLoadError, CorruptCheckpointError
from aiostage._memory import mapped_storage
from aiostage._persist._archive import DIRECT_ALIGN
from aiostage._persist._writer import DIRECT_MIN_BYTES, storage_view
from aiostage._threads import GilTurns, free_all_in_blocks

__all__ = [
    "DirectReads",
    "READ_BATCH_BYTES",
    "SYSCALL_BYTES",
    "ReadBatch",
    "Unsupported",
    "archive_prefix",
    "check_byteorder",
    "index_entries",
    "plan_reads",
    "read_batch",
    "read_record",
    "sized",
    "storage_records",
    "unpickle",
]

READ_BATCH_BYTES = 64 * 1024 * 1024
"""Most bytes one batch (one worker-thread step) reads; larger records are cut."""

SYSCALL_BYTES = 16 * 1024 * 1024
"""Most bytes one ``preadv`` system call reads.  Large calls let the kernel
issue large reads on a cold cache (1 GiB cold into touched memory here:
1 MiB calls 0.83 s, 16 MiB 0.61 s, 64 MiB 0.57 s, medians of 5); capped so
that one call does not keep its thread in the kernel for long."""

DIRECT_SYSCALL_BYTES = 2 * 1024 * 1024
"""Most bytes one ``O_DIRECT`` read puts straight into a storage.  Such a
read faults in all the pages of its window at once; into fresh memory
(a plain load in a new process), 16 MiB windows raised the event loop's
p99 lag to 2.4-3.1 ms, 1 MiB ones kept it at 1.0-1.2 ms, at the same
speed (the device gets requests of at most 4 MiB anyway)."""

BOUNCE_BYTES = 8 * 1024 * 1024
"""The bounce buffer of a reader thread: a record whose memory does not line
up with the file is read with ``O_DIRECT`` into it, this much at a time,
and copied out."""

_MAX_GAP = 4096
"""Records at most this far apart are read by one call (the gap is a local
header, a data descriptor and alignment padding: a few hundred bytes)."""

_IOV_MAX = 1024


class Unsupported(Exception):
    """The parallel path does not apply to this load; use ``torch.load``."""


class RecordEntry(Protocol):
    """Where a record's bytes lie (``aiostage._load._reader._Entry``)."""

    @property
    def name(self) -> str: ...

    @property
    def data_offset(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def crc(self) -> int: ...


@dataclass(frozen=True)
class ReadBatch:
    """One contiguous run of the file, read by one worker-thread step:
    ``parts`` are ``(storage, start, stop)`` byte ranges (``None`` storage:
    a gap to skip) covering ``[offset, offset + nbytes)``."""

    offset: int
    nbytes: int
    parts: tuple[tuple[torch.UntypedStorage | None, int, int], ...]


def archive_prefix(entries: Sequence[RecordEntry]) -> str:
    for e in entries:
        if e.name == "data.pkl":
            return ""
        if e.name.endswith("/data.pkl") and e.name.count("/") == 1:
            return e.name[: -len("data.pkl")]
    raise Unsupported("no top-level data.pkl")


def storage_records(entries: Sequence[RecordEntry], prefix: str) -> dict[str, RecordEntry]:
    """The ``{prefix}data/<key>`` records (the storages), by key."""
    data = prefix + "data/"
    cut = len(data)
    out: dict[str, RecordEntry] = {}
    turn = GilTurns()  # (tens of thousands of records: a worker thread's loop)
    for e in entries:
        turn()
        name = e.name
        if name.startswith(data) and "/" not in name[cut:]:
            out[name[cut:]] = e
    return out


def index_entries(
    entries: Sequence[RecordEntry],
) -> tuple[str, dict[str, RecordEntry], dict[str, RecordEntry], dict[str, int]]:
    """The archive's prefix, its records by name, its storage records by key
    and their sizes by key (for a worker thread: for 20,000 records these
    dicts take 9-10 ms to build, which held the event loop in one step)."""
    prefix = archive_prefix(entries)
    turn = GilTurns()
    by_name: dict[str, RecordEntry] = {}
    for e in entries:
        turn()
        by_name[e.name] = e
    records = storage_records(entries, prefix)
    sizes: dict[str, int] = {}
    for key, e in records.items():
        turn()
        sizes[key] = e.size
    return prefix, by_name, records, sizes


def plan_reads(
    entries: Sequence[RecordEntry],
    prefix: str,
    batch_bytes: int = READ_BATCH_BYTES,
    targets: Mapping[str, tuple[torch.UntypedStorage, int]] | None = None,
) -> tuple[dict[str, torch.UntypedStorage], list[ReadBatch]]:
    """Plan the calls that read every ``{prefix}data/<key>`` record, in file order.

    A record named in ``targets`` (key -> ``(storage, byte offset)``) is read
    into that memory; every other record gets a fresh storage (allocated,
    not touched: the reading threads fault its pages in).

    Returns:
        The fresh storages by key, and the batches.
    """
    records = sorted(storage_records(entries, prefix).items(), key=lambda kv: kv[1].data_offset)
    storages: dict[str, torch.UntypedStorage] = {}
    batches: list[ReadBatch] = []
    parts: list[tuple[torch.UntypedStorage | None, int, int]] = []
    start = end = 0
    turn = GilTurns()  # (tens of thousands of records: microseconds each)

    def flush() -> None:
        nonlocal parts
        if parts:
            batches.append(ReadBatch(start, end - start, tuple(parts)))
            parts = []

    for key, e in records:
        turn()
        if targets is not None and key in targets:
            storage, base = targets[key]
        else:
            storage, base = torch.UntypedStorage(e.size), 0
            storages[key] = storage
        if e.size == 0:
            continue
        pos = 0
        while pos < e.size:
            take = min(e.size - pos, batch_bytes)
            at = e.data_offset + pos
            gap = at - end
            if parts and (
                gap < 0
                or gap > _MAX_GAP
                or end - start + gap + take > batch_bytes
                or len(parts) + 2 > _IOV_MAX
            ):
                flush()
            if not parts:
                start = end = at
            elif gap:
                parts.append((None, 0, gap))
            parts.append((storage, base + pos, base + pos + take))
            end = at + take
            pos += take
    flush()
    return storages, batches


class _CachestatRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Cachestat(ctypes.Structure):
    _fields_ = (
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    )


_SYS_CACHESTAT = 451  # the same number on every architecture Linux 6.5+ has
_libc: Any = None


def page_cache_state(fd: int, offset: int, length: int) -> tuple[int, int] | None:
    """Pages of ``[offset, offset + length)`` of ``fd``'s file that are in
    the page cache, and how many of those are dirty (Linux 6.5+
    ``cachestat``: looks, reads nothing); ``None`` where it is missing."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    span = _CachestatRange(offset, length)
    stat = _Cachestat()
    rc = _libc.syscall(
        ctypes.c_long(_SYS_CACHESTAT),
        ctypes.c_uint(fd),
        ctypes.byref(span),
        ctypes.byref(stat),
        ctypes.c_uint(0),
    )
    if rc != 0:
        return None  # ENOSYS: an older kernel
    return int(stat.nr_cache), int(stat.nr_dirty)


def cached_under(state: tuple[int, int] | None, size: int, share: int) -> bool:
    """Whether the page cache holds under ``1/share`` of ``size`` bytes
    whose :func:`page_cache_state` is ``state`` (False where it is unknown).

    Under half of a file: a load opens it for direct reads (see
    :meth:`DirectReads.open`) and asks for its headers ahead (see
    ``aiostage._load._reader._Headers``).
    """
    return state is not None and share * state[0] * DIRECT_ALIGN < size


def uncached(state: tuple[int, int] | None, size: int, share: int) -> bool:
    """Whether ``size`` bytes whose :func:`page_cache_state` is ``state``
    are out of the page cache but for under ``1/share`` of them, none dirty.

    Under 1/16 of a file: almost none of it, so a load may drop what it
    brought in (see :meth:`DirectReads.close`).  Under half of a range: a
    direct read of it is worth it (see :meth:`DirectReads._read_uncached`).
    """
    return state is not None and not state[1] and cached_under(state, size, share)


class DirectReads:
    """The ``O_DIRECT`` descriptor of the checkpoint for one load, if any.

    ``fd`` is ``None`` where the platform or the file system has no direct
    I/O, where the kernel cannot tell what is in the page cache (before
    Linux 6.5), where the page cache held at least half the file when the
    load began, or once a read was refused (``EINVAL``: an alignment the
    file system does not take): the load then reads through the page cache.
    (A cached file read window by window, each window's residency asked
    first, took 0.22-0.25 s for 1 GiB against 0.19 s read plainly.)
    """

    def __init__(self) -> None:
        self.fd: int | None = None
        self._closed_fd: int | None = None
        self._used = False  # a read went past the page cache
        self._cold = False  # the cache held almost none of the file at open
        self._bounces: dict[int, torch.UntypedStorage] = {}
        self._lock = threading.Lock()

    def open(self, path: str, fd: int) -> None:
        """Open ``path`` (open as ``fd``) again with ``O_DIRECT`` where the
        platform, the kernel and the file system have it (blocking; for a
        worker thread).  The caller closes."""
        flag = getattr(os, "O_DIRECT", 0)
        whole = page_cache_state(fd, 0, 0)
        if not flag or whole is None:
            return
        size = os.fstat(fd).st_size
        if cached_under(whole, size, 2):  # mostly not cached
            with contextlib.suppress(OSError):  # EINVAL: not supported here
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flag)
            self._cold = uncached(whole, size, 16)

    def refuse(self) -> None:
        """Read the rest through the page cache (the descriptor stays open
        until :meth:`close`: another reader thread may be using it)."""
        if self.fd is not None:
            self._closed_fd, self.fd = self.fd, None

    def close(self) -> None:
        """Close the descriptor; the file leaves the page cache as it was found.

        A direct load still reads some pieces through the page cache (small
        records, the ends of records that do not line up with their memory):
        a few kilobytes cached every record.  A later read of the whole file
        through the cache would find its readahead broken at each of them
        and leave the file cached in small pieces, slower to read again (1
        GiB from the cache: 211-212 ms after a direct load, 189-192 ms
        otherwise).  So where the cache held almost none of the file when
        the load began (under 1/16), and reads went past it, all of the
        file is dropped from it again.
        """
        # (Not after a refusal: then the rest went through the cache.)
        if self.fd is not None and self._used and self._cold:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for fd in (self.fd, self._closed_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self._closed_fd = None
        self._bounces.clear()

    def read(self, fd: int, window: list[memoryview], offset: int) -> int | None:
        """Read ``window`` (one view of whole blocks) from ``offset`` with
        ``O_DIRECT``, unless most of it is in the page cache or any of it
        is dirty there; ``None``: read it through ``fd`` (the page cache)."""
        if offset % DIRECT_ALIGN:  # a short read ended mid-block
            return None
        return self._read_uncached(fd, window, offset, sum(v.nbytes for v in window))

    def read_bounced(self, fd: int, address: int, nbytes: int, offset: int) -> int | None:
        """Read up to ``nbytes`` file bytes from ``offset`` into memory at
        ``address`` (any alignment) with ``O_DIRECT`` into this thread's
        bounce buffer, then a copy (the GIL released); return how many
        landed (0 at the end of the file).  ``None``: read them through
        ``fd`` (the page cache) instead, as for :meth:`read`."""
        if self.fd is None:  # (before a bounce buffer is made for nothing)
            return None
        start = offset // DIRECT_ALIGN * DIRECT_ALIGN
        end = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
        length = min(BOUNCE_BYTES, end - start)
        bounce = self._bounce()
        got = self._read_uncached(fd, [storage_view(bounce)[:length]], start, length)
        if got is None:
            return None
        useful = min(got - (offset - start), nbytes)
        if useful <= 0:
            return 0
        ctypes.memmove(address, bounce.data_ptr() + (offset - start), useful)
        return useful

    def _read_uncached(
        self, fd: int, buffers: list[memoryview], offset: int, nbytes: int
    ) -> int | None:
        """``preadv`` of ``nbytes`` (whole blocks, from an aligned ``offset``)
        into ``buffers`` with ``O_DIRECT``; ``None`` where the page cache
        holds most of them or any dirty, or where the file system refuses
        the read (``EINVAL``: then the rest of the load goes through the
        page cache too)."""
        dfd = self.fd
        if dfd is None:
            return None
        if not uncached(page_cache_state(fd, offset, nbytes), nbytes, 2):
            return None
        try:
            got = os.preadv(dfd, buffers, offset)
            self._used = True
            return got
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.refuse()  # an alignment this file system does not take
            return None

    def _bounce(self) -> torch.UntypedStorage:
        """This thread's bounce buffer (page-aligned, made on first use)."""
        key = threading.get_ident()
        with self._lock:
            buffer = self._bounces.get(key)
            if buffer is None:
                buffer = self._bounces[key] = mapped_storage(BOUNCE_BYTES)
        return buffer

    def spans(self, batch: ReadBatch, views: Sequence[memoryview]) -> list[Span]:
        """``batch`` as file-ordered spans: each large part is one of its
        own, ``direct`` for its whole blocks where its memory lines up with
        the file (its partial blocks go with the buffered spans around it),
        ``bounced`` whole where it does not; the rest are buffered spans
        (the gaps at their ends left unread)."""
        spans: list[Span] = []
        pending: list[memoryview] = []
        wanted: list[bool] = []  # whether each pending view receives bytes (not a gap)
        start = at = batch.offset

        def flush(upto: int) -> None:
            # The gaps at either end of a buffered span (the local headers
            # and padding between large records) are not read: each was a
            # cold read through the page cache, whose readahead then ran on
            # into the next record's bytes (read again past the cache).  A
            # load into 200 tensors of 5 MiB that all went through a bounce
            # buffer spent 250-290 ms of one reader's time in them.
            nonlocal pending, wanted, start
            first = wanted.index(True) if True in wanted else len(wanted)
            last = len(wanted) - wanted[::-1].index(True) if True in wanted else first
            if first < last:
                skip = sum(v.nbytes for v in pending[:first])
                spans.append(Span(start + skip, pending[first:last], "buffered"))
            pending, wanted, start = [], [], upto

        for (storage, lo, _), view in zip(batch.parts, views, strict=True):
            lo_pad = -at % DIRECT_ALIGN
            hi = (at + view.nbytes) // DIRECT_ALIGN * DIRECT_ALIGN - at
            if self.fd is None or storage is None or view.nbytes < DIRECT_MIN_BYTES:
                pending.append(view)
                wanted.append(storage is not None)
            elif (storage.data_ptr() + lo - at) % DIRECT_ALIGN == 0 and hi > lo_pad:
                if lo_pad:
                    pending.append(view[:lo_pad])
                    wanted.append(True)
                flush(at + hi)
                spans.append(Span(at + lo_pad, [view[lo_pad:hi]], "direct"))
                if hi < view.nbytes:
                    pending.append(view[hi:])
                    wanted.append(True)
            else:
                flush(at + view.nbytes)
                spans.append(Span(at, [view], "bounced", storage.data_ptr() + lo))
            at += view.nbytes
        flush(at)
        return spans


class Span(NamedTuple):
    """Part of a batch, read one way: ``buffered`` (the page cache),
    ``direct`` (one view of whole aligned blocks) or ``bounced`` (one view
    whose memory, at ``address``, does not line up with the file)."""

    offset: int
    views: list[memoryview]
    kind: str
    address: int = 0


def read_batch(path: str, fd: int, batch: ReadBatch, direct: DirectReads | None = None) -> None:
    """Fill ``batch``'s storages from the file (blocking; for a worker thread).

    Each ``preadv`` call reads at most ``SYSCALL_BYTES``: a read into fresh
    memory runs in the kernel for its whole length (page faults included),
    and a kernel that only preempts at system-call boundaries would keep
    the event loop's thread off a core that long.  With ``direct``, large
    records that are not in the page cache are read with ``O_DIRECT`` (see
    the module's docstring).
    """
    views = [
        memoryview(bytearray(stop)) if storage is None else storage_view(storage)[lo:stop]
        for storage, lo, stop in batch.parts
    ]
    if direct is None or direct.fd is None:
        _read_span(path, fd, Span(batch.offset, views, "buffered"), None)
        return
    for span in direct.spans(batch, views):
        _read_span(path, fd, span, direct)


def _read_span(path: str, fd: int, span: Span, direct: DirectReads | None) -> None:
    """Read ``span`` in windows: a direct span's of at most
    ``DIRECT_SYSCALL_BYTES`` and a bounced span's of at most ``BOUNCE_BYTES``
    with ``O_DIRECT`` unless the page cache holds them (see
    :class:`DirectReads`), the rest through the page cache in windows of at
    most ``SYSCALL_BYTES``."""
    views = span.views
    nbytes = sum(v.nbytes for v in views)
    done = 0
    limit = DIRECT_SYSCALL_BYTES if span.kind == "direct" else SYSCALL_BYTES
    while done < nbytes:
        at = span.offset + done
        window = _window(views, done, limit)
        try:
            got = None
            if direct is not None and span.kind == "direct":
                got = direct.read(fd, window, at)
            elif direct is not None and span.kind == "bounced":
                got = direct.read_bounced(fd, span.address + done, nbytes - done, at)
            if got is None:
                got = os.preadv(fd, window, at)
        except OSError as exc:
            raise CheckpointLoadError(
                f"cannot read the checkpoint ({exc.strerror}, errno {exc.errno})", path=path
            ) from exc
        if got == 0:
            raise CorruptCheckpointError(
                "a record ends past the end of the file (truncated)", path=path
            )
        done += got


def _window(views: list[memoryview], skip: int, limit: int) -> list[memoryview]:
    """The bytes ``[skip, skip + limit)`` of the concatenated ``views``."""
    out: list[memoryview] = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        part = v[skip : skip + limit]
        out.append(part)
        skip = 0
        limit -= len(part)
        if limit == 0:
            break
    return out


def read_record(path: str, fd: int, entry: RecordEntry) -> bytes:
    """The bytes of a small record such as ``data.pkl`` (blocking)."""
    buf = bytearray(entry.size)
    got = os.preadv(fd, [buf], entry.data_offset) if entry.size else 0
    if got != entry.size:
        raise CorruptCheckpointError("record is truncated", path=path, record=entry.name)
    return bytes(buf)


def check_byteorder(path: str, fd: int, entries: Mapping[str, RecordEntry], prefix: str) -> None:
    """Raise :class:`Unsupported` unless the archive's storages are in this
    machine's byte order (torch assumes little-endian when unmarked)."""
    entry = entries.get(prefix + "byteorder")
    order = read_record(path, fd, entry).decode("ascii", "replace") if entry else "little"
    if order != sys.byteorder:
        raise Unsupported(f"byte order {order!r}")


def unpickle(
    path: str,
    pickled: bytes,
    storage_for: Callable[[str, int], torch.UntypedStorage],
    allow: Callable[[], contextlib.AbstractContextManager[Any]],
) -> Any:
    """Rebuild the state from ``data.pkl`` with torch's weights-only
    unpickler; ``storage_for(key, nbytes)`` gives the storage of each
    persistent id (called once per key)."""
    from torch import _weights_only_unpickler

    typed: dict[str, torch.storage.TypedStorage] = {}
    turn = GilTurns()  # the unpickler is pure Python: let the event loop run

    def persistent_load(pid: Any) -> torch.storage.TypedStorage:
        turn()
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise CorruptCheckpointError(f"unexpected persistent id {pid!r}", path=path)
        _, storage_type, key, _location, numel = pid
        key = torch.serialization._maybe_decode_ascii(key)
        if key in typed:
            return typed[key]
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        storage = storage_for(key, numel * torch._utils._element_size(dtype))
        typed[key] = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        return typed[key]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    tls = torch.serialization._serialization_tls
    before = tls.map_location
    tls.map_location = "cpu"  # where wrapper subclasses (DTensor) rebuild
    try:
        with allow():
            result = unpickler.load()
    finally:
        tls.map_location = before
    torch._utils._validate_loaded_sparse_tensors()
    # The unpickler's memo (every object the pickle built: a tuple of sizes,
    # one of strides and more per tensor) and the storage wrappers would all
    # be freed when this returns, in one call holding the GIL (5 ms for
    # 20,000 tensors): a block at a time instead.
    memo = getattr(unpickler, "memo", None)
    free_all_in_blocks(typed, *([memo] if isinstance(memo, dict) else []))
    return result


def sized(path: str, sizes: Mapping[str, int]) -> Callable[[str, int], None]:
    """A check that storage ``key`` has a record of ``nbytes`` bytes."""

    def check(key: str, nbytes: int) -> None:
        have = sizes.get(key)
        if have is None:
            raise CorruptCheckpointError(
                f"data.pkl refers to storage {key!r}, which has no record", path=path
            )
        if have != nbytes:
            raise CorruptCheckpointError(
                f"storage record holds {have} bytes, data.pkl expects {nbytes}",
                path=path,
                record=f"data/{key}",
            )

    return check
