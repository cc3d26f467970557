"""``load``: read a ``torch.save`` archive off the event loop, safely.

Loading always goes through ``torch.load(weights_only=True)``: the pickle can
only rebuild tensors, containers and primitive types, plus classes the caller
allow-lists with ``safe_globals``; it can never run arbitrary code.

The work is a few worker-thread steps (``anyio`` worker threads, never
abandoned even on a plain ``Task.cancel()``): open and check the archive's directory,
optionally verify every record's CRC-32 in chunks, then ``torch.load``.
"""

from __future__ import annotations

import errno
import os
import pickle
import threading
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from aiostage._exceptions import (
    CheckpointLoadError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from aiostage._threads import run_sync

__all__ = ["VERIFY_CHUNK_BYTES", "load", "verify_records"]

VERIFY_CHUNK_BYTES = 16 * 1024 * 1024
"""Bytes read (and checksummed) by one worker-thread step of verification."""

_LOCAL_HEADER_LEN = 30
_LOCAL_SIG = b"PK\x03\x04"

MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None
Progress = Callable[[int, int], None]
SafeGlobal = Callable[..., Any] | type | tuple[Callable[..., Any] | type, str]

_safe_globals_lock = threading.Lock()


@dataclass(frozen=True)
class _Entry:
    """Where one record's bytes lie in the file."""

    name: str
    data_offset: int
    size: int
    crc: int
    stored: bool


def _entry(path: str, f: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> _Entry:
    """Locate one record's bytes through its local header."""
    f.seek(info.header_offset)
    local = f.read(_LOCAL_HEADER_LEN)
    if len(local) < _LOCAL_HEADER_LEN or local[:4] != _LOCAL_SIG:
        raise CorruptCheckpointError(
            "bad local header (file truncated or overwritten)", path=path, record=info.filename
        )
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    data_offset = info.header_offset + _LOCAL_HEADER_LEN + name_len + extra_len
    if data_offset + info.compress_size > file_size:
        raise CorruptCheckpointError(
            "record extends past the end of the file (truncated)", path=path, record=info.filename
        )
    return _Entry(
        info.filename,
        data_offset,
        info.compress_size,
        info.CRC,
        info.compress_type == zipfile.ZIP_STORED,
    )


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
        with f, zipfile.ZipFile(f) as zf:
            entries = [_entry(path, f, info, st.st_size) for info in zf.infolist()]
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
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
    if not any(e.name.endswith("/data.pkl") or e.name == "data.pkl" for e in entries):
        raise CorruptCheckpointError("archive has no data.pkl record", path=path)
    return entries


def _crc_range(path: str, entry: _Entry, start: int, length: int, crc: int) -> int:
    """Fold ``length`` bytes of a stored record, from ``start``, into ``crc``."""
    buf = bytearray(length)
    with open(path, "rb", buffering=0) as f:
        got = os.preadv(f.fileno(), [buf], entry.data_offset + start)
    if got != length:
        raise CorruptCheckpointError("record is truncated", path=path, record=entry.name)
    return zlib.crc32(buf, crc)


def _crc_compressed(path: str, entry: _Entry) -> int:
    """CRC of a compressed record's uncompressed bytes (``torch.save`` never compresses).

    :mod:`zipfile` itself raises ``BadZipFile`` on a mismatch at the end.
    """
    crc = 0
    with zipfile.ZipFile(path) as zf, zf.open(entry.name) as member:
        while chunk := member.read(VERIFY_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


async def verify_records(path: str | os.PathLike[str], *, progress: Progress | None = None) -> None:
    """Check every record's CRC-32 against the archive's central directory.

    Raises:
        CorruptCheckpointError: a record's bytes do not match (``record``
            names it), or the archive is truncated or not a zip archive.
        CheckpointLoadError: the file is missing or unreadable.

    Cancellation:
        Stops between chunks: the chunk being read is finished by its worker
        thread, then the cancellation is re-raised; nothing is left open.
    """
    fspath = os.fspath(path)
    entries = await run_sync(_open_archive, fspath)
    await _verify_entries(fspath, entries, progress)


async def _verify_entries(path: str, entries: Sequence[_Entry], progress: Progress | None) -> None:
    total = sum(e.size for e in entries)
    done = 0
    for entry in entries:
        crc = 0
        try:
            if entry.stored:
                start = 0
                while start < entry.size:
                    length = min(VERIFY_CHUNK_BYTES, entry.size - start)
                    crc = await run_sync(_crc_range, path, entry, start, length, crc)
                    start += length
                    done += length
                    if progress is not None:
                        progress(done, total)
            else:
                crc = await run_sync(_crc_compressed, path, entry)
                done += entry.size
                if progress is not None:
                    progress(done, total)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise CorruptCheckpointError(
                f"cannot read record ({exc})", path=path, record=entry.name
            ) from exc
        if crc & 0xFFFFFFFF != entry.crc:
            raise CorruptCheckpointError(
                f"CRC-32 mismatch (stored {entry.crc:#010x}, computed {crc & 0xFFFFFFFF:#010x})",
                path=path,
                record=entry.name,
            )


def _torch_load(
    path: str, map_location: MapLocation, mmap: bool, safe_globals: Sequence[SafeGlobal]
) -> Any:
    """``torch.load(weights_only=True)`` with ``safe_globals`` allow-listed (worker thread).

    torch keeps one process-wide allow-list.  Only the globals not already in
    it are added, and removed again afterwards, so a caller's own
    ``add_safe_globals`` entries stay; loads that allow-list globals run one
    at a time so that one cannot remove what another still needs.
    """
    if not safe_globals:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    with _safe_globals_lock:
        present = torch.serialization.get_safe_globals()
        extra = [g for g in safe_globals if g not in present]
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)


def _translate(path: str, exc: Exception) -> CheckpointLoadError:
    """Turn a ``torch.load`` failure into the matching aiostage error."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and (
        "Weights only load failed" in text or "Unsupported global" in text
    ):
        first = text.strip().splitlines()[0] if text.strip() else "unsupported global"
        detail = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), first)
        return UnsafeCheckpointError(
            "weights_only loading refused an object in the checkpoint "
            f"({detail}). If you trust this checkpoint, allow-list the class with "
            "aiostage.load(path, safe_globals=[TheClass])",
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
    return CheckpointLoadError(f"torch.load failed ({type(exc).__name__}: {text})", path=path)


async def load(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    mmap: bool = False,
    verify: bool = False,
    safe_globals: Sequence[SafeGlobal] | None = None,
    progress: Progress | None = None,
) -> Any:
    """Load a checkpoint written by :func:`aiostage.persist` or ``torch.save``.

    Loading is ``weights_only``: the pickle can rebuild tensors, containers
    and primitive types only, never run code.  Other classes (a dataclass
    in the state, say) must be allow-listed by passing them in
    ``safe_globals``; otherwise :class:`UnsafeCheckpointError` is raised.
    Runs on an asyncio event loop (plain asyncio or anyio's asyncio backend).

    Args:
        path: a ``torch.save``-format zip archive (the legacy pre-1.6
            non-zip format is not accepted).
        map_location: as for ``torch.load``; CPU by default.
        mmap: map storages from the file instead of reading them
            (``torch.load(mmap=True)``): fast, lazy, and the tensors keep the
            file open.
        verify: first check every record's CRC-32 against the archive's
            directory (reads the whole file once more).  Without it a
            flipped bit in a storage is *not* detected.
        safe_globals: classes or functions the pickle may refer to, allowed
            for this load only (``torch.serialization.safe_globals``).  torch
            keeps one process-wide allow-list, so a load running concurrently
            in another thread sees them too while this one runs.
        progress: called on the event-loop thread as ``progress(done,
            total)``; with ``verify`` after each verified chunk (``total`` is
            the bytes of all records), and once more with ``(total, total)``
            when the state is loaded.

    Returns:
        The loaded object.

    Raises:
        CheckpointLoadError: the file is missing or unreadable, or torch
            failed for another reason (e.g. a bad ``map_location``).
        CorruptCheckpointError: not a zip archive, truncated, or (with
            ``verify``) a record's CRC-32 mismatch; ``record`` names the
            record when one is at fault.
        UnsafeCheckpointError: the checkpoint refers to a class not
            allow-listed; pass it in ``safe_globals`` if you trust the file.

    Cancellation:
        Verification stops between chunks.  The ``torch.load`` step itself
        cannot be interrupted: its worker thread is waited for (never
        abandoned), its result discarded, and then the cancellation is
        re-raised.  Nothing is left open (tensors of a discarded ``mmap``
        load release the file when collected).
    """
    fspath = os.fspath(path)
    entries = await run_sync(_open_archive, fspath)
    total = sum(e.size for e in entries)
    if verify:
        await _verify_entries(fspath, entries, progress)
    allowed = list(safe_globals or ())
    try:
        result = await run_sync(_torch_load, fspath, map_location, mmap, allowed)
    except Exception as exc:
        raise _translate(fspath, exc) from exc
    if progress is not None:
        progress(total, total)
    return result
