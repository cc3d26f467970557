"""The process-group harness fails the parent test whenever a worker fails."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _distributed import WorkerError, run_group

pytestmark = pytest.mark.timeout(60)


def _ok(rank: int, world: int) -> tuple[int, int]:
    import torch.distributed as dist

    t = __import__("torch").tensor([rank + 1])
    dist.all_reduce(t)
    return rank, int(t.item())


def _raises(rank: int, world: int) -> None:
    if rank == 1:
        raise KeyError("boom from rank 1")
    threading.Event().wait()  # rank 0 would wait forever: it is killed


def _exits(rank: int, world: int) -> None:
    if rank == 0:
        os._exit(3)


def _hangs(rank: int, world: int) -> None:
    threading.Event().wait()


def test_results_come_back_by_rank() -> None:
    assert run_group(_ok, 2, timeout=50) == [(0, 3), (1, 3)]


def test_worker_exception_fails_the_parent() -> None:
    with pytest.raises(WorkerError, match=r"(?s)rank 1 raised:.*KeyError: 'boom from rank 1'"):
        run_group(_raises, 2, init_pg=False, timeout=50)


def test_worker_exit_code_fails_the_parent() -> None:
    with pytest.raises(WorkerError, match="rank 0 exited with code 3"):
        run_group(_exits, 2, init_pg=False, timeout=50)


def test_hung_worker_is_killed_at_the_timeout() -> None:
    with pytest.raises(WorkerError, match="did not finish within 3 s"):
        run_group(_hangs, 2, init_pg=False, timeout=3)
