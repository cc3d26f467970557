"""aiostage: asyncio-native checkpointing for PyTorch.

Data path, one private module per room::

    traverse -> plan -> stage (CPU threads / accelerator stream) -> persist -> load
                                      \\-> replicate to a partner rank

Everything public is re-exported here; the private modules may change.
"""

from __future__ import annotations

from aiostage._exceptions import (
    AiostageError,
    CheckpointLoadError,
    CheckpointManagerError,
    CorruptCheckpointError,
    PeerTimeoutError,
    PersistError,
    ReplicationError,
    StagerClosedError,
    StagingError,
    StateMismatchError,
    UnsafeCheckpointError,
)

# stage: traverse -> plan -> copy into CPU memory
from aiostage._stage._engine import CacheInfo, StateDictStager
from aiostage._stage._options import StagingOptions
from aiostage._stage._stagers import AsyncStager, BlockingAsyncStager, DefaultStager

# persist and load: torch.save-compatible, atomic, durable
from aiostage._load._reader import load
from aiostage._persist._handle import SaveHandle
from aiostage._persist._writer import persist

# replication to a partner rank
from aiostage._replicate._recover import find_replica, load_replica
from aiostage._replicate._stager import ReplicationStager

# training-loop integration
from aiostage._train._manager import CheckpointManager, SaveStats
from aiostage._train._state import get_rng_state, get_state, set_rng_state, set_state

__version__ = "0.1.0"

__all__ = [
    # errors
    "AiostageError",
    "CheckpointLoadError",
    "CheckpointManagerError",
    "CorruptCheckpointError",
    "PeerTimeoutError",
    "PersistError",
    "ReplicationError",
    "StagerClosedError",
    "StagingError",
    "StateMismatchError",
    "UnsafeCheckpointError",
    # stage
    "AsyncStager",
    "BlockingAsyncStager",
    "CacheInfo",
    "DefaultStager",
    "StagingOptions",
    "StateDictStager",
    # persist and load
    "SaveHandle",
    "load",
    "persist",
    # replication
    "ReplicationStager",
    "find_replica",
    "load_replica",
    # training loop
    "CheckpointManager",
    "SaveStats",
    "get_rng_state",
    "get_state",
    "set_rng_state",
    "set_state",
]
