"""``load_replica``: read a rank's state back from its partner's replica file."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch

from aiostage._exceptions import CorruptCheckpointError, ReplicationError, UnsafeCheckpointError

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


def _load(path: Path, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnsafeCheckpointError(
                f"weights_only loading refused the replica ({exc}); "
                "it holds DTensors, ShardedTensors or custom classes: allow them with "
                "torch.serialization.add_safe_globals, or pass weights_only=False for a file "
                "this job wrote",
                path=path,
            ) from exc
        raise CorruptCheckpointError(f"cannot read the replica: {exc}", path=path) from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"cannot read the replica: {exc}", path=path) from exc


async def load_replica(
    storage_dir: str | os.PathLike[str], rank: int, *, weights_only: bool = True
) -> Any:
    """Load ``rank``'s state from the replica its partner persisted in ``storage_dir``.

    This is the recovery path that needs no live partner: a restarted rank
    (or any process that can read ``storage_dir``) reads the partner's file
    ``rank_{partner}_replica_partner_{rank}.pt`` (see :func:`find_replica`).
    Tensors come back on CPU, views sharing a storage still share it.

    ``weights_only`` (default) uses torch's restricted unpickler: plain
    tensors, containers and atomic values load; DTensors, ShardedTensors and
    custom classes need ``torch.serialization.add_safe_globals`` or
    ``weights_only=False`` (only for files this job wrote).

    Raises:
        ReplicationError: no replica of ``rank`` in ``storage_dir``.
        UnsafeCheckpointError: ``weights_only`` refused a global.
        CorruptCheckpointError: the file is not a readable archive.

    Cancellation: the read runs in a worker thread and is waited for; its
    result is dropped and nothing is left behind.
    """
    path = await anyio.to_thread.run_sync(find_replica, storage_dir, rank)
    return await anyio.to_thread.run_sync(_load, path, weights_only)
