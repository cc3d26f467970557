"""Measuring helpers for the benchmark harness: loop lag, RSS, timing, stats.

Not part of the package and not collected by pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

# --- event-loop lag -------------------------------------------------------------


class LagTicker:
    """A coroutine that sleeps ``interval`` seconds in a loop on the event loop.

    Each wake-up records its *lag*: how much later than asked it woke up
    (``gap - interval``, never negative).  A long lag means something held the
    event loop (a blocking call on the loop thread, or the GIL held by a
    worker thread).  Use as ``async with LagTicker() as ticker:``.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.lags.append(max(0.0, now - last - self.interval))
            last = now

    async def __aenter__(self) -> LagTicker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)  # let the ticker take its first timestamp
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def lag_stats(lags: list[float]) -> dict[str, float]:
    """Max and p99 lag in milliseconds, and the number of ticks."""
    if not lags:
        return {"lag_max_ms": 0.0, "lag_p99_ms": 0.0, "ticks": 0}
    ordered = sorted(lags)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"lag_max_ms": ordered[-1] * 1e3, "lag_p99_ms": p99 * 1e3, "ticks": len(ordered)}


class GcWatch:
    """Records the duration of every garbage collection while active, so that
    a loop stall can be told apart from a GC pause (which stalls every thread
    that wants the GIL, the event loop included)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t0))

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)

    def stats(self) -> dict[str, float]:
        full = [d for g, d in self.pauses if g == 2]
        return {
            "gc_count": len(self.pauses),
            "gc_full_count": len(full),
            "gc_max_ms": max((d for _, d in self.pauses), default=0.0) * 1e3,
        }


# --- the hypervisor -------------------------------------------------------------


def steal_ms() -> float:
    """CPU time the hypervisor gave to something else while this VM's CPUs
    wanted to run, all CPUs together, in ms (``/proc/stat``'s steal column,
    counted in ticks of 10 ms); 0 on bare metal.  Its rise over a phase
    tells a stall of the VM apart from one of the code measured."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")


def _kdamond_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().startswith("kdamond"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


_KDAMOND_PIDS: list[int] | None = None


def kdamond_ms() -> float:
    """CPU time of the kernel's DAMON threads (``kdamond.*``), in ms, from
    their ``/proc/PID/schedstat`` (ns); 0 where none runs.

    The development VM runs one with a ``pageout`` scheme (page cache left
    cold for a minute is reclaimed): a kernel thread that, with kernel
    preemption off, keeps a core until it yields, for up to 7 ms at a time
    in `stalls.py --perf`'s runs, with the loop's thread queued behind it.
    """
    global _KDAMOND_PIDS
    if _KDAMOND_PIDS is None:
        _KDAMOND_PIDS = _kdamond_pids()
    total = 0
    for pid in _KDAMOND_PIDS:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total / 1e6


# --- resident memory ------------------------------------------------------------


def proc_status_kib(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def rss_bytes() -> int:
    return proc_status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return proc_status_kib("VmHWM") * 1024


def reset_hwm() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def check_hwm_reset() -> dict[str, Any]:
    """Verify that :func:`reset_hwm` works: allocate and free 256 MiB, reset,
    and check that VmHWM came back down near VmRSS."""
    import torch

    big = torch.ones(256 * 1024 * 1024, dtype=torch.uint8)  # touched
    peak_with = hwm_bytes()
    del big
    before_reset = hwm_bytes()
    ok = reset_hwm()
    after = hwm_bytes()
    rss = rss_bytes()
    works = ok and after < before_reset - 128 * 1024 * 1024 and after <= rss + 16 * 1024 * 1024
    return {
        "works": works,
        "hwm_with_256mib_mib": peak_with / 2**20,
        "hwm_before_reset_mib": before_reset / 2**20,
        "hwm_after_reset_mib": after / 2**20,
        "rss_mib": rss / 2**20,
    }


# --- phases ---------------------------------------------------------------------


@dataclass
class Phase:
    """Timings and side measurements of one benchmark phase (several repeats)."""

    name: str
    nbytes: int
    times: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    peak_rss_delta: list[int] = field(default_factory=list)
    ticked: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def gbps(self) -> float:
        """Throughput of the median repeat, in GB/s (1e9 bytes per second)."""
        m = self.median
        return self.nbytes / m / 1e9 if m and m == m else float("nan")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "bytes": self.nbytes,
            "median_s": self.median,
            "min_s": min(self.times) if self.times else None,
            "max_s": max(self.times) if self.times else None,
            "times_s": self.times,
            "gbps": self.gbps,
        }
        if self.ticked:
            out.update(lag_stats(self.lags))
        if self.peak_rss_delta:
            out["peak_rss_delta_mib"] = max(self.peak_rss_delta) / 2**20
        out.update(self.extra)
        return out


@contextlib.contextmanager
def rss_window(phase: Phase) -> Iterator[None]:
    """Record the peak RSS growth over the RSS at entry (VmHWM reset at entry)."""
    reset_hwm()
    before = rss_bytes()
    yield
    phase.peak_rss_delta.append(hwm_bytes() - before)
