"""How much compute a checkpoint write takes from training, direct I/O vs the page cache.

A "training" thread runs fixed-size matmuls (one torch thread) in a loop; the
harness counts how many it finishes per second while idle and while
``aiostage.persist`` writes a staged 1 GiB state, with ``direct_io`` on and
off, interleaved (the page cache's writeback runs in kernel threads, so the
trainer's rate is the measure, not the process's CPU time).  Ratios within
the run:

    .venv/bin/python benchmarks/write_interference.py --dir /tmp/aiostage-bench [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from pathlib import Path

import torch

import aiostage


class Trainer:
    """Matmuls in a thread; ``rate()`` is matmuls per second over a window."""

    def __init__(self) -> None:
        self.count = 0
        self.stop = threading.Event()
        self.a = torch.randn(256, 256)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        b = torch.randn(256, 256)
        while not self.stop.is_set():
            torch.mm(self.a, b)
            self.count += 1


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.dir.mkdir(parents=True, exist_ok=True)
    n = int(args.size_gib * (1 << 30)) // 4 // 200
    state = {f"t{i}": torch.randn(n) for i in range(200)}
    stager = aiostage.DefaultStager()
    staged = await stager.stage(state)
    trainer = Trainer()
    trainer.thread.start()

    async def window(seconds: float) -> float:
        c0, t0 = trainer.count, time.perf_counter()
        await asyncio.sleep(seconds)
        return (trainer.count - c0) / (time.perf_counter() - t0)

    results: dict[str, list[tuple[float, float]]] = {"direct": [], "page cache": []}
    idle: list[float] = []
    path = args.dir / "interference.pt"
    for _ in range(args.rounds):
        for name, direct in (("direct", True), ("page cache", False)):
            if path.exists():
                path.unlink()
            os.sync()
            idle.append(await window(1.0))
            m0, t0 = trainer.count, time.perf_counter()
            await aiostage.persist(staged, path, direct_io=direct)
            dt = time.perf_counter() - t0
            results[name].append((dt, (trainer.count - m0) / dt))
    trainer.stop.set()
    trainer.thread.join()
    await stager.close()
    base = statistics.median(idle)
    print(f"idle training rate: {base:.0f} matmuls/s (median of {len(idle)} 1 s windows)")
    for name, rows in results.items():
        dt = statistics.median(r[0] for r in rows)
        rate = statistics.median(r[1] for r in rows)
        print(f"{name:>10}: write {dt:.3f} s, training at {rate / base:.2f}x its idle rate")


if __name__ == "__main__":
    asyncio.run(main())
