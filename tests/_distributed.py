"""Run a function on a real ``torch.distributed`` group of local processes.

Usage from a test (``tests/`` is not a package; put it on ``sys.path``)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _distributed import run_group

    def _worker(rank: int, world_size: int, arg: int) -> int:   # module level: it is pickled
        ...

    results = run_group(_worker, 2, 42, timeout=30)

Each worker is a fresh process (``forkserver``, see :func:`_context`) with
``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT`` and the process group
initialized (gloo over loopback by default) before ``fn(rank, world_size,
*args)`` runs.  ``fn`` may be a plain function or a coroutine function (run
with :func:`asyncio.run`).  Its return value (picklable) comes back in the
list, indexed by rank.  Warnings inside workers follow Python's defaults
(pytest's ``filterwarnings`` applies to the test process only).

The parent fails loudly: any worker exception is re-raised in the parent as
:class:`WorkerError` carrying the worker's traceback; a non-zero exit code or
a worker that outlives ``timeout`` (its whole group is then killed) fails too.
Synchronisation is by process exit and a result queue, never by sleeping.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["WorkerError", "free_port", "make_event", "run_group"]


class WorkerError(AssertionError):
    """A worker process raised, exited non-zero, or timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    init_pg: bool,
    results: Any,
    args: tuple[Any, ...],
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch.distributed as dist

        if init_pg:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=pg_timeout_s),
            )
        try:
            if inspect.iscoroutinefunction(fn):
                value = asyncio.run(fn(rank, world_size, *args))
            else:
                value = fn(rank, world_size, *args)
        finally:
            if init_pg and dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:
        _finish(results, (rank, False, traceback.format_exc()), 1)
    _finish(results, (rank, True, value), 0)


def _finish(results: Any, item: tuple[int, bool, Any], code: int) -> None:
    try:
        results.put(item)
    except Exception:  # an unpicklable return value
        results.put((item[0], False, traceback.format_exc()))
        code = 1
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (atexit handlers of torch/gloo can be slow or
    # block on a dead peer); the result is already flushed to the parent.
    os._exit(code)


_PRELOAD = ["torch", "torch.distributed", "aiostage", "pytest", "_distributed"]


def _context() -> Any:
    """A ``forkserver`` context whose server has imported torch once.

    Every worker forks from that clean, single-threaded server, so it starts
    in milliseconds instead of importing torch again (seconds on a loaded
    machine), and inherits nothing from the test process (no threads, no
    event loop, no process group).  Falls back to ``spawn`` where forkserver
    is unavailable.
    """
    if "forkserver" not in mp.get_all_start_methods():  # pragma: no cover - not Linux
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def make_event() -> Any:
    """A ``multiprocessing`` event that can be passed to the workers as an argument."""
    return _context().Event()


def run_group(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
    pg_timeout_s: float = 60.0,
    init_pg: bool = True,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes.

    Returns every rank's return value, indexed by rank.  Raises
    :class:`WorkerError` if any worker raised, exited with a non-zero code,
    or did not finish within ``timeout`` seconds (all workers are then
    killed).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, rank, world_size, port, backend, pg_timeout_s, init_pg, results, args),
            name=f"aiostage-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[bool, Any]] = {}
    failures: list[str] = []

    def drain(wait: float) -> bool:
        try:
            rank, ok, payload = results.get(timeout=wait) if wait > 0 else results.get_nowait()
        except queue.Empty:
            return False
        got[rank] = (ok, payload)
        if not ok:
            failures.append(f"rank {rank} raised:\n{payload}")
        return True

    try:
        # Results are drained while waiting (so no worker blocks on a full
        # pipe); stop at the first failure or at a worker that died silently.
        while len(got) < world_size and not failures:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            drain(min(left, 0.5))
            silent = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in got]
            if silent:
                while drain(0):  # results written just before exiting, one per rank
                    pass
                if any(procs[r].exitcode is not None and r not in got for r in silent):
                    break
        if not failures and len(got) == world_size:
            for proc in procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for proc in hung:
            proc.kill()
        for proc in hung:
            proc.join(timeout=10)
        results.close()
    for rank, proc in enumerate(procs):
        if rank not in got:
            if failures:
                continue
            if proc in hung:
                failures.append(f"rank {rank} did not finish within {timeout:.0f} s (killed)")
            else:
                failures.append(f"rank {rank} exited with code {proc.exitcode} and no result")
        elif proc.exitcode not in (0, None) and got[rank][0]:
            failures.append(f"rank {rank} exited with code {proc.exitcode}")
    if failures:
        raise WorkerError("\n\n".join(failures))
    return [got[rank][1] for rank in range(world_size)]
