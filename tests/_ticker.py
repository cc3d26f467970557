"""A ticker coroutine that measures how long the event loop was held."""

from __future__ import annotations

import time
from types import TracebackType

import anyio
import anyio.lowlevel


class LoopTicker:
    """Sleeps 1 ms in a loop and records the largest gap between wake-ups.

    Use as ``async with LoopTicker() as ticker:`` around the operation; read
    ``ticker.max_gap`` (seconds) and ``ticker.ticks`` afterwards.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.gaps: list[float] = []
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def max_gap(self) -> float:
        return max(self.gaps, default=0.0)

    @property
    def ticks(self) -> int:
        return len(self.gaps)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.gaps)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(self.interval)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now

    async def __aenter__(self) -> LoopTicker:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run)
        await anyio.lowlevel.checkpoint()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(exc_type, exc, tb)
