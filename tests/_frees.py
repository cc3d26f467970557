"""Test helper: watch where a module frees its objects per record."""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest


def watch_frees(
    monkeypatch: pytest.MonkeyPatch, module: types.ModuleType
) -> list[tuple[bool, int]]:
    """Spy on ``module.free_all_in_blocks`` from now on: for each call, in
    the returned list, whether it ran on the main (event-loop) thread and
    how many items its containers held.  Checks that it empties them."""
    freed: list[tuple[bool, int]] = []
    real = module.free_all_in_blocks

    def spy(*containers: Any) -> None:
        held = sum(len(c) for c in containers)
        real(*containers)
        assert all(len(c) == 0 for c in containers)
        freed.append((threading.current_thread() is threading.main_thread(), held))

    monkeypatch.setattr(module, "free_all_in_blocks", spy)
    return freed
