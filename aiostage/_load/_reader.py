"""``load``: read a ``torch.save`` archive off the event loop, safely.

A state is rebuilt from the archive's state index where it has one that
holds together (``aiostage._persist._index``: JSON, which can describe only
containers, scalars and plain tensors, and runs no code), and otherwise
with torch's ``weights_only`` unpickler: the pickle can only rebuild
tensors, containers and primitive types, plus classes the caller
allow-lists with ``safe_globals``; it can never run arbitrary code.

The work is a few worker-thread steps (``anyio`` worker threads, never
abandoned even on a plain ``Task.cancel()``): open and check the archive's
directory (``aiostage._load._zipdir``; each entry against its local header),
optionally verify every record's CRC-32 in chunks, then read the state.  A
CPU load reads every storage record with ``preadv`` (``READ_THREADS``
threads) while another thread rebuilds the state (``aiostage._load._records``);
an ``mmap`` load maps the file once and rebuilds onto slices of the mapping;
``into`` reads into existing tensors (``aiostage._load._into``).  Other
``map_location`` values and big-endian archives go through ``torch.load``.
The unpickler and the index's decoder hand the GIL to the event loop every
millisecond, so even large states do not stall it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import os
import pickle
import re
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import torch

from aiostage._exceptions import (
    AiostageError,
    CheckpointLoadError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from aiostage._gc import gc_paused
from aiostage._load import _into, _records
from aiostage._load._zipdir import CentralEntry, ZipDirectoryError, read_directory, widen
from aiostage._persist import _index
from aiostage._persist._archive import DIRECT_ALIGN
from aiostage._persist._writer import use_direct_io
from aiostage._progress import Progress, check_progress
from aiostage._threads import (
    GilTurns,
    free_all_in_blocks,
    free_in_blocks,
    run_all,
    run_sync,
    run_sync_stoppable,
)

__all__ = ["VERIFY_CHUNK_BYTES", "load", "verify_records"]

VERIFY_CHUNK_BYTES = 16 * 1024 * 1024
"""Bytes read (and checksummed) by one worker-thread step of verification."""

_VERIFY_MAX_RECORDS = 1024
"""Most (small) records checked by one worker-thread step of verification."""

_LOCAL_FMT = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_LOCAL_SIG = b"PK\x03\x04"
_DESCRIPTOR_SIG = b"PK\x07\x08"
_U32_MAX = 0xFFFFFFFF
_DESCRIPTOR_FLAG = 0x0008
_UTF8_FLAG = 0x0800
_ALLOWED_FLAGS = _DESCRIPTOR_FLAG | _UTF8_FLAG
_DOS_VOLUME = 0x08
_DOS_DIR = 0x10

# What the directory reader (or zipfile, for torch.load's archives) raises on
# a directory it cannot parse (bad sizes, names, extras).
_ZIP_ERRORS = (
    ZipDirectoryError,
    zipfile.BadZipFile,
    ValueError,
    EOFError,
    NotImplementedError,
    struct.error,
    LookupError,
    OverflowError,
)

MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None
SafeGlobal = Callable[..., Any] | type | tuple[Callable[..., Any] | type, str]

_safe_globals_lock = threading.Lock()

READ_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))
"""Worker threads that read a checkpoint's records at once.  One core is
left to the event loop: a read keeps its thread in the kernel (page faults,
the copy out of the page cache), and on a 2-core machine two readers pushed
the loop's p99 lag from about 1-3 ms to 3-9 ms (while reading twice as
fast from the page cache).

Each reader reads all its batches in one worker-thread step.  With a step
per batch (64 MiB), every hop between the loop and the reader woke each in
turn, and the scheduler took that for two tasks that work together: it
woke the reader on the loop's core.  There the reader's wake-ups on I/O
completion took the core from the loop, which waited 2-4 ms for it while
the other core idled (seen in ``perf``'s scheduler events).  Cold loads of
1 GiB, alternating the two versions: a median of 9-12 loop stalls over
1.5 ms and a p99 lag of 2.2-2.3 ms with a step per batch; 1 stall and
0.4-0.5 ms in one step.  (The load itself took 5-8 % longer in the
medians, within this VM's noise: a reader on a core of its own sleeps
there on each read, and an idle virtual core wakes more slowly.)"""


COLD_READ_THREADS = 2
"""Reader threads, at least, for a load ``into`` existing tensors from a file
that is mostly not in the page cache (read with ``O_DIRECT``): such a
reader waits on the device without using a core, so two keep the device
busy while one of them copies out of its bounce buffer, and cost the event
loop little."""


_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
"""How a ``torch.save`` file in the legacy (pre-1.6, non-zip) format begins:
its magic number, pickled."""


class _LegacyFormat(Exception):
    """Raised by :func:`_open_archive`: the file is not a zip archive but a
    legacy ``torch.save`` file of ``size`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _legacy_refused(path: str, what: str) -> CheckpointLoadError:
    return CheckpointLoadError(
        "a torch.save file in the legacy (pre-1.6, non-zip) format, which has no CRC-32s "
        f"to verify and no records to read in place or map, so {what} cannot read it; "
        "load it with aiostage.load(path) alone (and persist it again to convert it)",
        path=path,
    )


def _starts_legacy(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
    except OSError:
        return False


class _Entry(NamedTuple):
    """Where one record's bytes lie in the file."""

    name: str
    data_offset: int
    size: int
    crc: int


def _corrupt(path: str, message: str, info: CentralEntry) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, path=path, record=info.filename)


def _check_central(path: str, info: CentralEntry) -> None:
    """Reject central-directory fields that no ``torch.save`` record carries.

    ``torch.load`` (miniz) trusts more of the directory than the CRC covers:
    a record whose MS-DOS directory bit is set, say, is read as a directory
    and its storage left uninitialised.  ``torch.save`` writes flags 0x0808
    (data descriptor, UTF-8 names), aiostage writes 0; both store
    uncompressed and leave the attributes zero.
    """
    if info.filename != info.orig_filename:  # a NUL byte in the name
        raise _corrupt(path, "record name holds a NUL byte", info)
    if info.is_dir() or info.external_attr & (_DOS_DIR | _DOS_VOLUME):
        raise _corrupt(path, "record is marked as a directory", info)
    mode = info.external_attr >> 16
    if mode and not stat.S_ISREG(mode):
        raise _corrupt(
            path, f"unexpected file attributes {info.external_attr:#010x} (not a file)", info
        )
    if info.flag_bits & ~_ALLOWED_FLAGS:
        raise _corrupt(
            path, f"unexpected flag bits {info.flag_bits:#06x} (encrypted or unknown)", info
        )
    if info.compress_type != zipfile.ZIP_STORED:
        raise _corrupt(
            path,
            f"compression method {info.compress_type} (torch.save stores records uncompressed)",
            info,
        )
    if info.compress_size != info.file_size:
        raise _corrupt(
            path,
            f"stored size {info.compress_size} differs from the size {info.file_size}",
            info,
        )


def _sizes_match(
    info: CentralEntry, fields: tuple[int, int], extra: bytes, descriptor: bool
) -> bool:
    """Whether a local header's (uncompressed, compressed) sizes agree with the directory."""
    wanted = (info.file_size, info.compress_size)
    if fields == wanted:  # (the usual case)
        return True
    got = widen(fields, extra)
    return got is not None and all(
        g == w or (descriptor and g == 0) for g, w in zip(got, wanted, strict=True)
    )


_Want = tuple[int, int]
"""``(offset, nbytes)``: the bytes a record's check reads next."""

_PREFETCH_MERGE = 64 * 1024
"""Header reads at most this far apart are prefetched as one range."""

_MAX_INDEX_BYTES = 1 << 30
"""A state index larger than this is not read (the pickle is used)."""

_CHECK_GROUP = 4096
"""Records checked in step at a time (each check in flight holds a
generator: a directory of a million records is checked a group at a time)."""


class _Headers:
    """Reads the small pieces around the records (local headers, data
    descriptors), and leaves a file that the page cache did not hold as it
    found it.

    Read one by one, they leave a few kilobytes cached every record.  The
    read of the whole file that follows then finds its way broken every few
    megabytes: its readahead stops at each cached piece and goes on in
    smaller steps, the page cache ends up holding the file in small pieces,
    and every later read of it from the cache is slower (1 GiB in 200
    records, read again: 240-251 ms against 171-174 ms).  So where almost
    none of the file was cached to begin with, it is all dropped from the
    cache again when the headers are read (``POSIX_FADV_DONTNEED``).
    (Reading each header without readahead instead cost a disk read per
    record: 1.4 s for 20,000 records.)

    :meth:`check` runs the records' checks in step: every check's first
    read, then every second read, and so on.  Where the cache held under
    half the file, each round's reads are asked of the kernel first
    (``POSIX_FADV_WILLNEED``, which starts them all and waits for none), so
    the device serves them together instead of one round trip each.  The
    check of a cold 1 GiB archive of 200 records (two reads a header), in
    a load: 25-43 ms one by one, 5-11 ms so.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = os.dup(fd)
        self._drop = self._prefetch = False
        if hasattr(os, "posix_fadvise"):
            cached = _records.page_cache_state(self.fd, 0, 0)
            self._drop = _records.uncached(cached, size, 16)
            self._prefetch = _records.cached_under(cached, size, 2)

    def read(self, offset: int, nbytes: int) -> bytes:
        return os.pread(self.fd, nbytes, offset)

    def prefetch(self, wants: Iterable[_Want]) -> None:
        """Start reading ``wants`` into the page cache, each with the page
        after it (a header's extra field runs on into it), ranges close
        together as one."""
        if not self._prefetch:
            return
        merged: list[list[int]] = []
        for offset, nbytes in sorted(wants):
            lo = offset // DIRECT_ALIGN * DIRECT_ALIGN
            hi = -(-(offset + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN + DIRECT_ALIGN
            if merged and lo <= merged[-1][1] + _PREFETCH_MERGE:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            with contextlib.suppress(OSError):  # (a hint: the reads follow anyway)
                os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)

    def check(self, checks: Sequence[Generator[_Want, bytes, _Entry]]) -> list[_Entry]:
        """Run ``checks`` (see :func:`_entry`) in step; their entries, in order."""
        turn = GilTurns()  # (tens of thousands of records: microseconds each)
        done: list[_Entry | None] = [None] * len(checks)
        wants: dict[int, _Want] = {}
        for i, steps in enumerate(checks):
            turn()
            wants[i] = next(steps)
        while wants:
            self.prefetch(wants.values())
            later: dict[int, _Want] = {}
            for i, (offset, nbytes) in wants.items():
                turn()
                try:
                    later[i] = checks[i].send(self.read(offset, nbytes))
                except StopIteration as finished:
                    done[i] = finished.value
            wants = later
        return cast(list[_Entry], done)

    def __enter__(self) -> _Headers:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._drop:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(self.fd)


def _descriptor_matches(tail: bytes, info: CentralEntry) -> bool:
    """Whether a data descriptor (``tail``: the 24 bytes after a record)
    repeats the directory's CRC and sizes."""
    if tail[:4] == _DESCRIPTOR_SIG:
        tail = tail[4:]
    if len(tail) < 12 or int.from_bytes(tail[:4], "little") != info.CRC:
        return False
    size = info.file_size
    if struct.unpack_from("<II", tail, 4) == (size, size):
        return True
    return len(tail) >= 20 and struct.unpack_from("<QQ", tail, 4) == (size, size)


def _entry(path: str, info: CentralEntry, file_size: int) -> Generator[_Want, bytes, _Entry]:
    """Check one record's directory entry against its local header; locate
    its bytes.  Yields each read it needs and is sent its bytes (see
    :meth:`_Headers.check`)."""
    _check_central(path, info)
    # One read for the header, its name and (usually) its extra field.
    head = yield (info.header_offset, _LOCAL_FMT.size + len(info.raw_name) + 128)
    local = head[: _LOCAL_FMT.size]
    if len(local) < _LOCAL_FMT.size or local[:4] != _LOCAL_SIG:
        raise _corrupt(path, "bad local header (file truncated or overwritten)", info)
    _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _LOCAL_FMT.unpack(local)
    end = _LOCAL_FMT.size + name_len + extra_len
    if len(head) < end:
        head += yield (info.header_offset + len(head), end - len(head))
    raw_name = head[_LOCAL_FMT.size : _LOCAL_FMT.size + name_len]
    extra = head[_LOCAL_FMT.size + name_len : end]
    if raw_name != info.raw_name:
        raise _corrupt(path, f"local header names another record ({raw_name!r})", info)
    descriptor = bool(flags & _DESCRIPTOR_FLAG)
    if flags != info.flag_bits or method != info.compress_type:
        raise _corrupt(path, "local header's flags or method differ from the directory", info)
    if crc != info.CRC and not (descriptor and crc == 0):
        raise _corrupt(path, "local header's CRC-32 differs from the directory", info)
    if not _sizes_match(info, (usize, csize), extra, descriptor):
        raise _corrupt(path, "local header's sizes differ from the directory", info)
    data_offset = info.header_offset + _LOCAL_FMT.size + name_len + extra_len
    if data_offset + info.compress_size > file_size:
        raise _corrupt(path, "record extends past the end of the file (truncated)", info)
    if descriptor and not _descriptor_matches((yield (data_offset + info.compress_size, 24)), info):
        raise _corrupt(path, "data descriptor differs from the directory", info)
    return _Entry(info.filename, data_offset, info.compress_size, info.CRC)


def _open_archive(path: str) -> list[_Entry]:
    """Check that ``path`` is a readable zip archive; list its records (worker thread)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise CheckpointLoadError("checkpoint file not found", path=path) from exc
    except OSError as exc:
        raise CheckpointLoadError(
            f"cannot access the checkpoint ({exc.strerror})", path=path
        ) from exc
    if not os.path.isfile(path):
        raise CheckpointLoadError("checkpoint path is not a regular file", path=path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, errors told apart
    except OSError as exc:
        raise CheckpointLoadError(
            f"cannot open the checkpoint ({exc.strerror})", path=path
        ) from exc
    try:
        with f, _Headers(f.fileno(), st.st_size) as headers:
            infos = read_directory(f.fileno(), st.st_size)
            entries = []
            for at in range(0, len(infos), _CHECK_GROUP):
                checks = [_entry(path, info, st.st_size) for info in infos[at : at + _CHECK_GROUP]]
                entries += headers.check(checks)
            free_in_blocks(infos)  # (an object per record: see free_in_blocks)
    except CorruptCheckpointError:
        raise
    except _ZIP_ERRORS as exc:
        if _starts_legacy(path):
            raise _LegacyFormat(st.st_size) from exc
        raise CorruptCheckpointError(
            f"not a torch.save zip archive, or truncated ({exc})", path=path
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a seek to a negative offset: bad directory
            raise CorruptCheckpointError(
                "the zip directory points outside the file (truncated or overwritten)",
                path=path,
            ) from exc
        raise CheckpointLoadError(
            f"cannot read the checkpoint ({exc.strerror})", path=path
        ) from exc
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CorruptCheckpointError("two records share a name", path=path, record=dup)
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CorruptCheckpointError("archive has no data.pkl record", path=path)
    return entries


async def verify_records(path: str | os.PathLike[str], *, progress: Progress | None = None) -> None:
    """Check every record's CRC-32 against the archive's central directory.

    Raises:
        CorruptCheckpointError: a record's bytes do not match (``record``
            names it), or the archive is truncated or not a zip archive.
        CheckpointLoadError: the file is missing or unreadable, or it is a
            legacy (pre-1.6, non-zip) ``torch.save`` file, which has no
            CRC-32s.

    Cancellation:
        Stops between chunks: the chunk being read is finished by its worker
        thread, then the cancellation is re-raised; nothing is left open.
    """
    check_progress(progress)
    fspath = os.fspath(path)
    try:
        entries = await run_sync(_open_archive, fspath)
    except _LegacyFormat:
        raise _legacy_refused(fspath, "verify_records()") from None
    await _verify_entries(fspath, entries, progress)


def _check_crc(path: str, entry: _Entry, crc: int) -> None:
    if crc & _U32_MAX != entry.crc:
        raise CorruptCheckpointError(
            f"CRC-32 mismatch (stored {entry.crc:#010x}, computed {crc & _U32_MAX:#010x})",
            path=path,
            record=entry.name,
        )


def _verify_groups(entries: Sequence[_Entry]) -> list[list[_Entry]]:
    """Consecutive records in groups of at most ``VERIFY_CHUNK_BYTES`` and
    ``_VERIFY_MAX_RECORDS`` records; a larger record is a group of its own."""
    groups: list[list[_Entry]] = []
    current: list[_Entry] = []
    filled = 0
    for entry in entries:
        if current and (
            filled + entry.size > VERIFY_CHUNK_BYTES or len(current) >= _VERIFY_MAX_RECORDS
        ):
            groups.append(current)
            current, filled = [], 0
        current.append(entry)
        filled += entry.size
    if current:
        groups.append(current)
    return groups


def _pread(path: str, fd: int, view: memoryview, at: int, record: str) -> int:
    """``preadv`` of ``view`` from ``at``; a failure names ``record``."""
    try:
        return os.preadv(fd, [view], at)
    except OSError as exc:
        raise CorruptCheckpointError(
            f"cannot read record ({exc.strerror or exc})", path=path, record=record
        ) from exc


def _read_exactly(path: str, fd: int, entry: _Entry, view: memoryview, offset: int) -> None:
    """Fill ``view`` with ``entry``'s bytes from ``offset`` (within the record)."""
    got = _pread(path, fd, view, entry.data_offset + offset, entry.name)
    if got != view.nbytes:
        raise CorruptCheckpointError("record is truncated", path=path, record=entry.name)


def _read_group(path: str, fd: int, group: Sequence[_Entry], buf: memoryview) -> bool:
    """Read the run of the file that holds ``group`` (records in file order,
    the headers between them included) into ``buf`` with one call: one
    sequential read, which the kernel reads ahead of, rather than a read per
    record with a gap before each, which it takes for random reads.  False
    (nothing read) where the records are not in file order or their run
    does not fit in ``buf``."""
    start = group[0].data_offset
    end = group[-1].data_offset + group[-1].size
    ordered = all(a.data_offset + a.size <= b.data_offset for a, b in itertools.pairwise(group))
    if not ordered or end - start > buf.nbytes:
        return False
    got = _pread(path, fd, buf[: end - start], start, group[0].name)
    short = next((e for e in group if e.data_offset + e.size > start + got), None)
    if short is not None:
        raise CorruptCheckpointError("record is truncated", path=path, record=short.name)
    return True


@contextlib.contextmanager
def _sequential(path: str) -> Iterator[int]:
    """A descriptor of ``path`` of its own for one group or chunk of a
    verification, marked for sequential reads.

    Each read is followed by its CRC (4 ms for 16 MiB here), and a window of
    readahead larger than the read goes on reading meanwhile.  On one
    descriptor kept for the whole file, the kernel's readahead fell behind
    at times (1 GiB from a cold cache: 0.66-0.73 s, or 1.2-2.7 s in some
    runs); on a fresh one for each group it kept up: 0.63-0.68 s, against
    0.70-0.75 s for plain reads on fresh descriptors.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointLoadError(
            f"cannot read the checkpoint ({exc.strerror}, errno {exc.errno})", path=path
        ) from exc
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield fd
    finally:
        os.close(fd)


def _verify_all(
    stop: threading.Event,
    path: str,
    entries: Sequence[_Entry],
    report: Callable[[int, threading.Event], bool],
) -> None:
    """Check every record's CRC-32, all in one worker-thread step (see
    ``READ_THREADS``): small records a group at a time, large ones in
    ``VERIFY_CHUNK_BYTES`` chunks, read into one buffer used over and over.
    After each group or chunk, ``report(bytes done, stop)``; it returns
    whether to go on.  Stops between them once ``stop`` is set."""
    chunk = VERIFY_CHUNK_BYTES
    groups = _verify_groups(entries)
    size = min(chunk, max((e.size for e in entries), default=0))
    for group in groups:  # room for each group's run of the file, up to twice a chunk
        run = group[-1].data_offset + group[-1].size - group[0].data_offset
        if len(group) > 1 and size < run <= 2 * chunk:
            size = run
    buf = memoryview(bytearray(size))
    done = 0
    for group in groups:
        if stop.is_set():
            return
        if group[0].size > chunk:  # a large record, chunk by chunk
            entry, crc = group[0], 0
            for offset in range(0, entry.size, chunk):
                view = buf[: min(chunk, entry.size - offset)]
                with _sequential(path) as fd:
                    _read_exactly(path, fd, entry, view, offset)
                crc = zlib.crc32(view, crc)
                done += view.nbytes
                if not report(done, stop) or stop.is_set():
                    return
            _check_crc(path, entry, crc)
            continue
        base = group[0].data_offset
        with _sequential(path) as fd:
            whole = _read_group(path, fd, group, buf)
            for entry in group:
                if whole:
                    view = buf[entry.data_offset - base : entry.data_offset - base + entry.size]
                else:
                    view = buf[: entry.size]
                    _read_exactly(path, fd, entry, view, 0)
                _check_crc(path, entry, zlib.crc32(view))
                done += entry.size
        if not report(done, stop):
            return


async def _verify_entries(path: str, entries: Sequence[_Entry], progress: Progress | None) -> None:
    """Check every record's CRC-32 in a worker thread; ``progress`` on the
    loop after each group of small records or chunk of a large one.  An
    error that ``progress`` raises stops the check and is raised; once the
    check is cancelled, ``progress`` is not called again."""
    total = sum(e.size for e in entries)
    loop = asyncio.get_running_loop()
    failed: list[BaseException] = []

    def on_loop(done: int, stop: threading.Event) -> None:
        if progress is not None and not failed and not stop.is_set():
            try:
                progress(done, total)
            except BaseException as exc:  # raised below, once the thread is done
                failed.append(exc)

    def report(done: int, stop: threading.Event) -> bool:
        if progress is not None:
            loop.call_soon_threadsafe(on_loop, done, stop)
        return not failed

    await run_sync_stoppable(_verify_all, path, entries, report)
    if failed:
        raise failed[0]


@contextlib.contextmanager
def _allowing(safe_globals: Sequence[SafeGlobal]) -> Iterator[None]:
    """Allow-list ``safe_globals`` for the weights-only unpickler (worker thread).

    torch keeps one process-wide allow-list.  Only the globals not already in
    it are added, and removed again afterwards, so a caller's own
    ``add_safe_globals`` entries stay; loads that allow-list globals run one
    at a time so that one cannot remove what another still needs.
    """
    if not safe_globals:
        yield
        return
    with _safe_globals_lock:
        present = torch.serialization.get_safe_globals()
        extra = [g for g in safe_globals if g not in present]
        with torch.serialization.safe_globals(extra):
            yield


def _torch_load(
    path: str, map_location: MapLocation, mmap: bool, safe_globals: Sequence[SafeGlobal]
) -> Any:
    """``torch.load(weights_only=True)`` with ``safe_globals`` allow-listed (worker thread)."""
    with _allowing(safe_globals):
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)


def _map_file(path: str) -> torch.UntypedStorage:
    """The whole file as one private, copy-on-write mapped CPU storage."""
    whole = torch.UntypedStorage.from_file(path, False, os.stat(path).st_size)
    return cast(torch.UntypedStorage, whole)


def _is_cpu(map_location: MapLocation) -> bool:
    if isinstance(map_location, str):
        return map_location == "cpu"
    return isinstance(map_location, torch.device) and map_location == torch.device("cpu")


async def _open_read_only(path: str) -> int:
    """A read-only descriptor of ``path``, opened in a worker thread.

    Cancellation:
        The open finishes in its thread; the descriptor is closed and the
        cancellation re-raised.
    """
    opened: list[int] = []

    def open_file() -> None:
        opened.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))

    try:
        await run_sync(open_file)
    except OSError as exc:
        raise CheckpointLoadError(
            f"cannot open the checkpoint ({exc.strerror})", path=path
        ) from exc
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return opened[0]


async def _read_state(
    path: str,
    entries: Sequence[_Entry],
    safe_globals: Sequence[SafeGlobal],
    into: Any,
    mmap: bool,
    direct_io: bool,
    garbage: list[Any],
) -> Any:
    """Load onto the CPU: every storage record read in parallel while the
    pickle is unpickled onto their (fresh) storages, or unpickled first and
    then read (``into``), or unpickled onto slices of one private mapping of
    the file (``mmap``).

    ``direct_io``: read large records that are not in the page cache with
    ``O_DIRECT`` (see ``_records``).

    ``garbage``: where a load that succeeds leaves its lists and dicts of an
    object or more per record, for the caller to free off the loop (see
    :func:`aiostage._threads.free_all_in_blocks`).

    Raises:
        Unsupported: the archive needs ``torch.load`` (see ``_records``).
    """
    prefix, by_name, records, sizes = await run_sync(_records.index_entries, entries)
    check = _records.sized(path, sizes)
    allow = functools.partial(_allowing, safe_globals)
    fd = await _open_read_only(path)
    direct = _records.DirectReads()

    async def read(batches: list[_records.ReadBatch]) -> None:
        queue = iter(batches)
        taking = threading.Lock()

        def reader(stop: threading.Event) -> None:
            # All of a reader's batches in one worker-thread step, not one
            # step each (see READ_THREADS); a cancellation, or another
            # reader's error, stops it between batches.
            while not stop.is_set():
                with taking:
                    batch = next(queue, None)
                if batch is None:
                    return
                _records.read_batch(path, fd, batch, direct)

        threads = READ_THREADS
        if direct.fd is not None:  # (only opened for a file mostly not cached)
            threads = max(threads, COLD_READ_THREADS)
        job = functools.partial(run_sync_stoppable, reader)
        await run_all([job] * min(threads, max(1, len(batches))))

    try:
        await run_sync(_records.check_byteorder, path, fd, by_name, prefix)
        pickle_entry = by_name[prefix + "data.pkl"]
        index_entry = by_name.get(prefix + _index.INDEX_NAME)

        def rebuild(storage_for: Callable[[str, int], torch.UntypedStorage]) -> Any:
            # (blocking; for a worker thread) The index where it holds
            # together, else the pickle: data.pkl is the authority, and
            # storage_for may be asked for a key twice.
            if index_entry is not None and index_entry.size <= _MAX_INDEX_BYTES:
                index = _records.read_record(path, fd, index_entry)
                with contextlib.suppress(_index.BadIndex):
                    return _index.decode(index, pickle_entry.crc, sizes, storage_for)
            pickled = _records.read_record(path, fd, pickle_entry)
            return _records.unpickle(path, pickled, storage_for, allow)

        if mmap:
            # One private (copy-on-write) mapping of the whole file, as
            # torch.load(mmap=True) makes; each storage is a slice of it.
            whole = await run_sync(_map_file, path)

            def slice_for(key: str, nbytes: int) -> torch.UntypedStorage:
                check(key, nbytes)
                at = records[key].data_offset
                return cast(torch.UntypedStorage, whole[at : at + nbytes])

            state = await run_sync(rebuild, slice_for)
            garbage += (by_name, records, sizes)
            return state
        if into is None:
            storages, batches = await run_sync(_records.plan_reads, entries, prefix)

            def storage_for(key: str, nbytes: int) -> torch.UntypedStorage:
                check(key, nbytes)
                return storages[key]

            loaded: list[Any] = []

            async def unpickle() -> None:
                # Beside the reads: it only wraps the storages, whose bytes
                # the readers fill meanwhile; nothing is returned before both
                # are done.  (A state of 20,000 small tensors: 1.2 s of
                # unpickling, 0.2 s of reads.)
                loaded.append(await run_sync(rebuild, storage_for))

            await run_all([functools.partial(read, batches), unpickle])
            garbage += (by_name, records, sizes, storages, batches)
            return loaded[0]

        keys: dict[int, str] = {}
        metas: list[torch.UntypedStorage] = []

        def meta_for(key: str, nbytes: int) -> torch.UntypedStorage:
            check(key, nbytes)
            metas.append(torch.UntypedStorage(nbytes, device="meta"))
            keys[metas[-1]._cdata] = key
            return metas[-1]

        planned: list[tuple[_into.Placement, dict[str, torch.UntypedStorage], Any]] = []

        def plan_into() -> None:  # (one thread hop for the three steps)
            loaded = rebuild(meta_for)
            placement = _into.place(path, loaded, into, keys, sizes)
            scratch, batches = _records.plan_reads(entries, prefix, targets=placement.targets)
            planned.append((placement, scratch, batches))

        jobs: list[Callable[[], Awaitable[Any]]] = [functools.partial(run_sync, plan_into)]
        if direct_io:
            # Only into existing tensors: a plain load reads into fresh
            # memory, where direct reads (straight in, or through a bounce
            # buffer) raised the loop's p99 lag from 0.5-0.8 ms to 2.4-3.1
            # ms (one load of 1 GiB in a fresh process), and storages that
            # line up with the file would have to be fresh mappings, which
            # cannot be resized as torch.load's can.  Asking the page cache
            # about the whole file takes milliseconds: beside the unpickling.
            jobs.append(functools.partial(run_sync, direct.open, path, fd))
        await run_all(jobs)
        placement, scratch, batches = planned[0]
        await read(batches)
        await run_sync(_into.copy_rest, placement.copies, scratch)
        garbage += (by_name, records, sizes, keys, metas, scratch, batches)
        return placement.result
    finally:
        direct.close()
        os.close(fd)


def _translate(path: str, exc: Exception) -> CheckpointLoadError:
    """Turn a ``torch.load`` failure into the matching aiostage error.

    torch prefixes *every* error of the ``weights_only`` unpickler with
    "Weights only load failed", a corrupted ``data.pkl`` included, so only
    its refusal of a global (torch's "Unsupported global: GLOBAL x.y was not
    an allowed global" and "GLOBAL x.y whose module x is blocked") counts as
    unsafe; a missing import is a plain load error; the rest is corruption.
    """
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        refused = re.search(r"Unsupported global: GLOBAL (\S+) was not an allowed global", text)
        if refused:
            return UnsafeCheckpointError(
                "weights_only loading refused an object in the checkpoint "
                f"(GLOBAL {refused.group(1)} is not allow-listed). If you trust this "
                "checkpoint, allow-list the class with "
                "aiostage.load(path, safe_globals=[TheClass])",
                path=path,
            )
        blocked = re.search(r"GLOBAL (\S+) whose module (\S+) is blocked", text)
        if blocked:
            return UnsafeCheckpointError(
                f"the checkpoint refers to {blocked.group(1)}; weights_only loading never "
                f"allows module {blocked.group(2)}",
                path=path,
            )
        needs = re.search(r"``(\S+)`` must be imported to load (.+?)\s*$", text, re.MULTILINE)
        if needs:
            return CheckpointLoadError(
                f"import {needs.group(1)} before loading this checkpoint (it holds "
                f"{needs.group(2)})",
                path=path,
            )
    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return CorruptCheckpointError(f"cannot unpickle data.pkl ({text})", path=path)
    if isinstance(exc, OSError):
        return CheckpointLoadError(
            f"cannot read the checkpoint ({exc.strerror or text})", path=path
        )
    if isinstance(exc, RuntimeError) and (
        "PytorchStreamReader" in text or "zip archive" in text or "central directory" in text
    ):
        return CorruptCheckpointError(f"torch could not read the archive ({text})", path=path)
    if isinstance(exc, RuntimeError) and "unexpected EOF" in text:  # a truncated legacy file
        return CorruptCheckpointError(f"the file ends early ({text})", path=path)
    return CheckpointLoadError(f"torch.load failed ({type(exc).__name__}: {text})", path=path)


async def load(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    mmap: bool = False,
    into: Any = None,
    verify: bool = False,
    safe_globals: Sequence[SafeGlobal] | None = None,
    progress: Progress | None = None,
    direct_io: bool | None = None,
) -> Any:
    """Load a checkpoint written by :func:`aiostage.persist` or ``torch.save``.

    Loading is ``weights_only``: the pickle can rebuild tensors, containers
    and primitive types only, never run code.  A file :func:`persist` wrote
    for a state of containers, scalars and plain tensors is rebuilt from its
    state index instead (JSON, no code either; 7 us a tensor against 55 for
    the unpickler), unless the index is missing, stale or malformed.  Other
    classes (a dataclass in the state, say) must be allow-listed by passing
    them in ``safe_globals``; otherwise :class:`UnsafeCheckpointError` is
    raised.
    Runs on an asyncio event loop (plain asyncio or anyio's asyncio backend).

    Args:
        path: a ``torch.save``-format zip archive.  A file in the legacy
            (pre-1.6, non-zip) format is read whole by ``torch.load``
            (``weights_only`` too); it has no CRC-32s and no records to
            read in place, so it takes neither ``verify``, ``into`` nor
            ``mmap``.
        map_location: as for ``torch.load``; CPU by default.  A CPU load
            reads the records with ``READ_THREADS`` worker threads (one
            core is left to the event loop); any other value goes through
            ``torch.load``.
        mmap: map storages from the file instead of reading them (one
            private, copy-on-write mapping, as ``torch.load(mmap=True)``
            makes): fast, lazy, and the tensors keep the file open.
        into: a state to read the checkpoint into, in place: dicts, lists
            and tuples of dense CPU tensors, such as a model's
            ``state_dict()`` or :func:`aiostage.get_state`'s result.  Each
            tensor of the checkpoint is read straight into the tensor at the
            same key path, so the load allocates no memory for the state
            and makes no second copy when restoring.  Every tensor of the
            checkpoint needs a counterpart of the same shape and dtype, and
            every tensor of ``into`` one in the checkpoint; otherwise
            :class:`StateMismatchError` names the key path, before anything
            is written.  Returns the checkpoint's structure and non-tensor
            values with ``into``'s tensors in it.  Not with ``mmap`` or a
            non-CPU ``map_location``.
        verify: first check every record's CRC-32 against the archive's
            directory (reads the whole file once more).  Without it a
            flipped bit in a storage is *not* detected.  Either way the
            directory is checked first: every record must be a stored
            (uncompressed) file with no unexpected flags or attributes,
            and its local header (and ``torch.save``'s data descriptor)
            must repeat the directory's name, CRC-32 and sizes.  (A load
            from the state index does not read ``data.pkl``, so only
            ``verify`` finds a damaged one.)
        safe_globals: classes or functions the pickle may refer to, allowed
            for this load only (``torch.serialization.safe_globals``).  torch
            keeps one process-wide allow-list, so a load running concurrently
            in another thread sees them too while this one runs.
        progress: called on the event-loop thread as ``progress(done,
            total)``; with ``verify`` after each verified chunk or group of
            small records (``total`` is the bytes of all records), and once
            more with ``(total, total)`` when the state is loaded.
        direct_io: with ``into``, and when the page cache holds less than
            half of the file, read each record of at least 512 KiB that is
            not in the page cache with ``O_DIRECT`` (Linux 6.5+, whose
            ``cachestat`` tells what the cache holds): at the device's
            speed, without the CPU time of filling the page cache and
            copying out of it, and without evicting the job's cached files.
            The blocks go straight into tensors that line up with the file,
            through a small bounce buffer into those that do not.
            What is cached is read from the cache; where the file system
            refuses ``O_DIRECT`` everything goes through the page cache.  A
            plain load always reads through the page cache (into fresh
            memory direct reads cost the event loop more, see
            ``aiostage._load._reader``).  ``None`` (default): on unless the
            environment sets ``AIOSTAGE_DIRECT_IO=0``.

    Returns:
        The loaded object.

    Raises:
        CheckpointLoadError: the file is missing or unreadable, a legacy
            (non-zip) file was given ``verify``, ``into`` or ``mmap``, or
            torch failed for another reason (e.g. a bad ``map_location``).
        CorruptCheckpointError: not a zip archive, truncated, a record's
            directory entry or local header is inconsistent, ``data.pkl``
            cannot be unpickled, or (with ``verify``) a record's CRC-32
            mismatch; ``record`` names the record when one is at fault.
        UnsafeCheckpointError: the checkpoint refers to a class not
            allow-listed; pass it in ``safe_globals`` if you trust the file.
        StateMismatchError: (``into``) the checkpoint's tensors do not fit
            ``into``'s; ``key`` names the first key path that differs.
        ValueError: ``into`` with ``mmap`` or a non-CPU ``map_location``,
            or ``AIOSTAGE_DIRECT_IO`` set to something other than 0 or 1.
            (A ``data.pkl`` that the unpickler cannot parse is a
            :class:`CorruptCheckpointError`.)
        TypeError: ``progress`` is not a plain callable (an ``async def``
            callback would never run).

    Cancellation:
        Verification and reading stop between chunks (16 and 64 MiB): the chunks
        in flight are waited for, their memory released, and the
        cancellation re-raised.  Rebuilding the state (unpickling, or
        decoding the state index) and a ``torch.load`` step cannot be
        interrupted: the worker thread is waited for (never abandoned), its
        result discarded, and then the cancellation is re-raised.  Nothing
        is left open (tensors of a discarded ``mmap`` load release the file
        when collected).  With ``into``, a load cancelled (or failing) while
        reading leaves ``into``'s tensors holding a mix of old and new
        values: load the checkpoint again.
    """
    check_progress(progress)
    direct = use_direct_io(direct_io)
    fspath = os.fspath(path)
    allowed = list(safe_globals or ())
    cpu = _is_cpu(map_location)
    if into is not None and (mmap or not cpu):
        raise ValueError(
            "load(into=...) reads into CPU tensors: it takes neither mmap nor map_location"
        )
    with gc_paused():  # see aiostage._gc: tens of thousands of new objects
        entries: list[_Entry] | None
        try:
            entries = await run_sync(_open_archive, fspath)
        except _LegacyFormat as legacy:
            flags = (("verify=True", verify), ("into=...", into is not None), ("mmap=True", mmap))
            given = [name for name, on in flags if on]
            if given:
                raise _legacy_refused(fspath, f"load({', '.join(given)})") from None
            entries, total = None, legacy.size  # torch.load reads it whole
        else:
            total = sum(e.size for e in entries)
            if verify:
                await _verify_entries(fspath, entries, progress)
        result: Any = None
        # torch.load places storages on other devices, and reads legacy files.
        with_torch = not cpu or entries is None
        if not with_torch:
            assert entries is not None
            try:
                garbage: list[Any] = [entries]
                result = await _read_state(fspath, entries, allowed, into, mmap, direct, garbage)
                # An object or more per record in each: freed off the loop.
                await run_sync(free_all_in_blocks, *garbage)
            except _records.Unsupported:  # big-endian, or an odd layout: torch.load copes
                if into is not None:
                    raise CheckpointLoadError(
                        "load(into=...) cannot read this archive (it is not in this machine's "
                        "byte order); load it without into",
                        path=fspath,
                    ) from None
                with_torch = True
            except AiostageError:
                raise
            except Exception as exc:
                raise _translate(fspath, exc) from exc
        if with_torch:
            try:
                result = await run_sync(_torch_load, fspath, map_location, mmap, allowed)
            except Exception as exc:
                raise _translate(fspath, exc) from exc
    if progress is not None:
        progress(total, total)
    return result
