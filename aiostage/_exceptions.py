"""Every error aiostage raises, under one root.

::

    AiostageError
    ├── StagingError                 an object in the state cannot be staged
    │                                (``.path`` names it, e.g. ``optimizer.state.3.exp_avg``)
    ├── StagerClosedError            ``stage()`` or ``save()`` after ``close()``
    ├── PersistError                 writing a checkpoint failed; the previous one is intact
    │                                (``.path``, ``.errno``, ``.key``)
    ├── CheckpointLoadError          a checkpoint could not be read
    │   ├── CorruptCheckpointError   a record's bytes or the archive's structure are wrong
    │   ├── UnsafeCheckpointError    ``weights_only`` loading refused a global
    │   └── StateMismatchError       ``load(into=...)``: the checkpoint's tensors do not
    │                                fit the given state (``.key`` names the key path)
    ├── ReplicationError             exchanging state with the partner rank failed
    │   └── PeerTimeoutError         the partner did not answer within the timeout
    └── CheckpointManagerError       no checkpoint to restore, or a bad manifest

Lower-level errors (``OSError``, ``pickle`` errors, ``RuntimeError`` from
torch.distributed) are translated at the boundary with ``raise ... from exc``
so that the original stays reachable as ``__cause__``.  Cancellation is never
wrapped: a cancelled call re-raises the cancellation itself.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "AiostageError",
    "StagingError",
    "StagerClosedError",
    "PersistError",
    "CheckpointLoadError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "StateMismatchError",
    "ReplicationError",
    "PeerTimeoutError",
    "CheckpointManagerError",
]


class AiostageError(Exception):
    """Root of every error aiostage raises."""


class StagingError(AiostageError):
    """An object in the state cannot be staged.

    ``path`` is the object's key path in the state, dotted
    (``"optimizer.state.3.exp_avg"``); ``"<root>"`` for the state itself.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{message} (at {path!r})")
        self.path = path


class StagerClosedError(AiostageError):
    """The stager was closed; it cannot stage any more."""


class PersistError(AiostageError):
    """Writing a checkpoint failed.

    The previous checkpoint at ``path`` (if any) is untouched and no
    temporary file is left behind.  ``errno`` carries the OS error number when
    the cause was an ``OSError`` (for example ``errno.ENOSPC`` or
    ``errno.EFBIG``), else ``None``.  ``key`` is the key path, dotted
    (``"optim.param_groups.0.scheduler"``), of the value in the state that
    could not be pickled, when that was the cause and the value was found;
    else ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str],
        errno: int | None = None,
        key: str | None = None,
    ):
        name = f" [{_errno.errorcode.get(errno, errno)}]" if errno is not None else ""
        at = f" (at {key!r})" if key is not None else ""
        super().__init__(f"{message}{at}{name}: {os.fspath(path)}")
        self.path = os.fspath(path)
        self.errno = errno
        self.key = key


class CheckpointLoadError(AiostageError):
    """A checkpoint file could not be read."""

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        super().__init__(f"{message}: {os.fspath(path)}")
        self.path = os.fspath(path)


class CorruptCheckpointError(CheckpointLoadError):
    """The file is not a complete, intact checkpoint.

    ``record`` names the archive record whose bytes failed the check, when
    one did.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str], record: str | None = None
    ) -> None:
        where = f" (record {record!r})" if record is not None else ""
        super().__init__(f"{message}{where}", path=path)
        self.record = record


class UnsafeCheckpointError(CheckpointLoadError):
    """``weights_only`` loading refused a global the checkpoint refers to.

    Allow-list trusted classes with ``aiostage.load(path, safe_globals=[...])``.
    """


class StateMismatchError(CheckpointLoadError):
    """``load(path, into=state)``: a tensor of the checkpoint has no
    counterpart of the same shape and dtype in ``state``, or the other way
    round.

    ``key`` is the key path in the state, dotted (``"model.layer.weight"``).
    Raised before any tensor of ``state`` is written.
    """

    def __init__(self, message: str, *, key: str, path: str | os.PathLike[str]) -> None:
        super().__init__(f"{message} (at {key!r})", path=path)
        self.key = key


class ReplicationError(AiostageError):
    """Exchanging state with the partner rank failed."""

    def __init__(self, message: str, *, peer: int | None = None) -> None:
        where = f" (partner rank {peer})" if peer is not None else ""
        super().__init__(f"{message}{where}")
        self.peer = peer


class PeerTimeoutError(ReplicationError):
    """The partner rank did not answer within the timeout (it may have died)."""


class CheckpointManagerError(AiostageError):
    """A checkpoint directory holds nothing to restore, or a bad manifest."""
