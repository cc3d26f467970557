"""Test helpers: make ``aiostage.load`` read in small batches; count its
worker-thread steps."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import pytest

from aiostage._load import _records


def small_read_batches(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    """Plan every load's reads in batches of at most ``nbytes`` (many
    batches, so that a test can act between them)."""
    real_plan = _records.plan_reads
    monkeypatch.setattr(
        _records,
        "plan_reads",
        lambda entries, prefix, **kw: real_plan(entries, prefix, nbytes, **kw),
    )


def count_thread_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the worker-thread steps (``anyio.to_thread.run_sync`` calls)
    from now on, in the returned one-item list."""
    steps = [0]
    real_step = anyio.to_thread.run_sync

    async def counting(*args: Any, **kwargs: Any) -> Any:
        steps[0] += 1
        return await real_step(*args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return steps
