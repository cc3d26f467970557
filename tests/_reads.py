"""Test helper: make ``aiostage.load`` read in small batches."""

from __future__ import annotations

import pytest

from aiostage._load import _records


def small_read_batches(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    """Plan every load's reads in batches of at most ``nbytes`` (many thread
    hops, so that a test can act between them)."""
    real_plan = _records.plan_reads
    monkeypatch.setattr(
        _records,
        "plan_reads",
        lambda entries, prefix, **kw: real_plan(entries, prefix, nbytes, **kw),
    )
