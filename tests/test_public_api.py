"""The public surface is exactly what we mean to export."""

from __future__ import annotations

import importlib
import inspect

import aiostage

EXPECTED = {
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
    # persist / load
    "SaveHandle",
    "persist",
    "load",
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
}


def test_all_lists_the_public_names() -> None:
    assert set(aiostage.__all__) == EXPECTED
    assert len(aiostage.__all__) == len(set(aiostage.__all__))
    for name in aiostage.__all__:
        assert hasattr(aiostage, name), name
        assert not name.startswith("_")


def test_every_export_lives_in_a_private_module() -> None:
    for name in aiostage.__all__:
        obj = getattr(aiostage, name)
        module = getattr(obj, "__module__", "")
        assert module.startswith("aiostage._"), (name, module)


def test_every_error_derives_from_the_root() -> None:
    errors = importlib.import_module("aiostage._exceptions")
    for name in errors.__all__:
        cls = getattr(aiostage, name)
        assert issubclass(cls, aiostage.AiostageError), name


def test_public_coroutines_document_cancellation() -> None:
    targets = [
        aiostage.DefaultStager,
        aiostage.BlockingAsyncStager,
        aiostage.SaveHandle,
        aiostage.ReplicationStager,
        aiostage.CheckpointManager,
    ]
    for cls in targets:
        for attr, member in inspect.getmembers(cls, inspect.iscoroutinefunction):
            if attr.startswith("_"):
                continue
            assert "Cancellation" in (member.__doc__ or ""), f"{cls.__name__}.{attr}"
    for name in aiostage.__all__:
        obj = getattr(aiostage, name)
        if inspect.iscoroutinefunction(obj):
            assert "Cancellation" in (obj.__doc__ or ""), name
