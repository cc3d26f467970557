"""``load_replica``: read a rank's state back from its partner's replica file."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aiostage._exceptions import CorruptCheckpointError, ReplicationError
from aiostage._threads import run_sync

__all__ = ["find_replica", "load_replica"]

_NAME = re.compile(r"^rank_(\d+)_replica_partner_(\d+)\.pt$")


def find_replica(storage_dir: str | os.PathLike[str], rank: int) -> Path:
    """The replica file holding ``rank``'s state in ``storage_dir``.

    It is ``rank_{partner}_replica_partner_{rank}.pt``, written by ``rank``'s
    partner.  If several partners left one (the world size changed), the
    newest is returned.

    Raises:
        ReplicationError: no replica of ``rank`` in ``storage_dir``.
    """
    directory = Path(os.fspath(storage_dir))
    found: list[tuple[float, Path]] = []
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise ReplicationError(f"cannot list the replica directory {directory}: {exc}") from exc
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is not None and int(match.group(2)) == rank:
            try:
                found.append((entry.stat().st_mtime, entry))
            except OSError:
                continue
    if not found:
        raise ReplicationError(f"no replica of rank {rank} in {directory}")
    return max(found)[1]


def _load_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"cannot read the replica: {exc}", path=path) from exc


async def load_replica(
    storage_dir: str | os.PathLike[str],
    rank: int,
    *,
    verify: bool = True,
    safe_globals: Sequence[Any] | None = None,
    weights_only: bool = True,
) -> Any:
    """Load ``rank``'s state from the replica its partner persisted in ``storage_dir``.

    This is the recovery path that needs no live partner: a restarted rank
    (or any process that can read ``storage_dir``) reads the partner's file
    ``rank_{partner}_replica_partner_{rank}.pt`` (see :func:`find_replica`).
    Tensors come back on CPU; views sharing a storage still share it.

    By default the file is read with :func:`aiostage.load`: every record's
    CRC-32 is checked first (``verify``), and the pickle is loaded
    ``weights_only`` (plain tensors, containers and atomic values, and
    DTensors, whose classes torch allow-lists; other classes must be listed
    in ``safe_globals``).  ShardedTensors need ``weights_only=False``, which
    runs a plain ``torch.load`` after the same CRC check and may execute code
    from the file: use it only for files written by this job.

    Raises:
        ReplicationError: no replica of ``rank`` in ``storage_dir``.
        UnsafeCheckpointError: ``weights_only`` refused a global.
        CorruptCheckpointError: the file is truncated, or a record's bytes
            do not match their CRC-32.
        CheckpointLoadError: the file could not be read.

    Cancellation: the CRC check stops between chunks; the ``torch.load``
    step runs in a worker thread that is waited for, its result dropped.
    Nothing is left open.
    """
    from aiostage._load._reader import load, verify_records

    path = await run_sync(find_replica, storage_dir, rank)
    if not weights_only:
        if verify:
            await verify_records(path)
        return await run_sync(_load_trusted, path)
    return await load(path, verify=verify, safe_globals=safe_globals)
