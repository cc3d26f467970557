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
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from aiostage._exceptions import CheckpointLoadError, CorruptCheckpointError
from aiostage._persist._writer import storage_view
from aiostage._threads import GilTurns

__all__ = [
    "READ_BATCH_BYTES",
    "SYSCALL_BYTES",
    "ReadBatch",
    "Unsupported",
    "archive_prefix",
    "check_byteorder",
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
    return {
        e.name[len(data) :]: e
        for e in entries
        if e.name.startswith(data) and "/" not in e.name[len(data) :]
    }


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

    def flush() -> None:
        nonlocal parts
        if parts:
            batches.append(ReadBatch(start, end - start, tuple(parts)))
            parts = []

    for key, e in records:
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


def read_batch(path: str, fd: int, batch: ReadBatch) -> None:
    """Fill ``batch``'s storages from the file (blocking; for a worker thread).

    Each ``preadv`` call reads at most ``SYSCALL_BYTES``: a read into fresh
    memory runs in the kernel for its whole length (page faults included),
    and a kernel that only preempts at system-call boundaries would keep
    the event loop's thread off a core that long.
    """
    views = [
        memoryview(bytearray(stop)) if storage is None else storage_view(storage)[lo:stop]
        for storage, lo, stop in batch.parts
    ]
    done = 0
    while done < batch.nbytes:
        try:
            got = os.preadv(fd, _window(views, done, SYSCALL_BYTES), batch.offset + done)
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
