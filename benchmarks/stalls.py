"""What holds the event loop during first calls (a diagnostic, not a benchmark).

Usage::

    python benchmarks/stalls.py --dir /tmp/aiostage-bench [--size-gib 1] [--repeat 5] [--perf]
        [--phases control,stage,save,warm,persist,load]

Prepares the machine as the harness does before its aiostage phases (state A
made, and the harness's own limit phases run on it, their buffers kept),
then runs the ``--phases`` asked for: the fresh-memory control, first
``stage()`` and first ``save()`` calls on fresh stagers, warm ``save()``
calls on one stager, ``persist()`` of a staged copy (not by default) and cold
loads, while a ticker records every wake-up later than ``--over`` ms, with
its monotonic timestamps.

With ``--perf``, ``perf record`` (``cpu-clock`` samples, ``sched:sched_switch``
and ``sched:sched_wakeup`` events, kernel and native call chains, on the
``CLOCK_MONOTONIC`` clock, all CPUs) watches the machine, and each stall is
printed with what the loop thread was doing inside it: on the CPU (its sampled
stacks), or off it (each switch-out, its state and the kernel stack that led
there), which other threads held the CPUs meanwhile, and the loop's longest
wait for a core: where it was queued, behind whom, and whether another core
sat idle meanwhile (the scheduler on this VM queues a woken thread behind a
busy one while the other core idles: see the eighth round in the README).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from _measure import steal_ms
from run import (
    GIB,
    Bench,
    copy_into_fresh_mappings,
    drop_cache,
    fresh_copy_pieces,
    make_state_a,
    remove,
    unmap,
)

import aiostage


@dataclass
class Stall:
    label: str
    start: float
    end: float
    steal: float = 0.0

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass
class StallTicker:
    """Sleeps 1 ms in a loop and keeps every gap longer than ``over``."""

    label: str
    over: float
    stalls: list[Stall] = field(default_factory=list)
    ticks: int = 0

    async def run(self) -> None:
        last, stolen = time.monotonic(), steal_ms()
        while True:
            await asyncio.sleep(0.001)
            now, now_stolen = time.monotonic(), steal_ms()
            self.ticks += 1
            if now - last - 0.001 > self.over:
                self.stalls.append(Stall(self.label, last + 0.001, now, now_stolen - stolen))
            last, stolen = now, now_stolen


async def watched(label: str, over: float, coro: Any, stalls: list[Stall]) -> Any:
    ticker = StallTicker(label, over)
    task = asyncio.create_task(ticker.run())
    await asyncio.sleep(0)
    try:
        t0 = time.perf_counter()
        out = await coro
        took = time.perf_counter() - t0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    worst = max(ticker.stalls, key=lambda s: s.ms, default=None)
    longest = "" if worst is None else f", longest {worst.ms:.1f} ms (steal {worst.steal:.0f} ms)"
    print(f"  {label}: {took:.3f} s, {len(ticker.stalls)} stalls{longest}")
    stalls.extend(ticker.stalls)
    return out


# --- perf -----------------------------------------------------------------------

HEADER = re.compile(r"^\s*(\S.*?)\s+(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\d+\s+)?(\S+):\s*(.*)$")


@dataclass
class Event:
    comm: str
    tid: int
    cpu: int
    t: float
    name: str
    trace: str
    stack: list[str]


def perf_events(data: Path) -> list[Event]:
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,tid,cpu,time,event,trace,ip,sym"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    events: list[Event] = []
    cur: Event | None = None
    for line in out.splitlines():
        if not line.strip():
            cur = None
            continue
        if cur is not None and line.startswith(("\t", " " * 8)):
            parts = line.split(None, 1)
            cur.stack.append(parts[1] if len(parts) > 1 else parts[0])
            continue
        m = HEADER.match(line)
        if m:
            cur = Event(m[1], int(m[2]), int(m[3]), float(m[4]), m[6], m[7], [])
            events.append(cur)
    return events


def short(stack: list[str], n: int = 6) -> str:
    frames = [re.sub(r"\+0x[0-9a-f]+$", "", f) for f in stack[:n]]
    return " < ".join(frames)


def explain(stalls: list[Stall], events: list[Event], loop_tid: int, names: dict[int, str]) -> None:
    for s in sorted(stalls, key=lambda s: -s.ms):
        inside = [e for e in events if s.start <= e.t <= s.end]
        print(f"\n== {s.label}: {s.ms:.1f} ms stall, VM steal in it {s.steal:.0f} ms")
        on_cpu = [e for e in inside if e.tid == loop_tid and e.name == "cpu-clock"]
        print(f"  loop thread on CPU: {len(on_cpu)} samples")
        for stack, n in collections.Counter(short(e.stack) for e in on_cpu).most_common(5):
            print(f"    {n:4d}  {stack}")
        for e in inside:
            if e.name.endswith("sched_switch") and f"prev_pid={loop_tid} " in e.trace:
                state = re.search(r"prev_state=(\S+)", e.trace)
                print(
                    f"  loop switched out at +{(e.t - s.start) * 1e3:.1f} ms, "
                    f"state {state[1] if state else '?'}: {short(e.stack, 8)}"
                )
        others = collections.Counter(
            e.tid for e in inside if e.tid != loop_tid and e.name == "cpu-clock"
        )
        for tid, n in others.most_common(4):
            top = collections.Counter(
                short(e.stack, 4) for e in inside if e.tid == tid and e.name == "cpu-clock"
            ).most_common(1)[0][0]
            who = names.get(tid) or next(e.comm for e in inside if e.tid == tid)
            print(f"  thread {tid} ({who}): {n} samples, mostly {top}")
        queued(s, events, loop_tid, names)


def queued(s: Stall, events: list[Event], loop_tid: int, names: dict[int, str]) -> None:
    """The longest wait of the loop thread for a core in the stall ``s``:
    from becoming runnable (woken, or preempted) to running, on which CPU,
    who held that CPU meanwhile, and the other CPUs' idle samples (a loop
    queued behind a worker while a core idles)."""
    waits: list[tuple[Event, Event]] = []
    ready: Event | None = None
    for e in events:
        if e.t > s.end + 0.001:
            break
        if e.t < s.start - 0.05:
            continue
        if e.name.endswith("sched_wakeup") and f"pid={loop_tid} " in e.trace:
            ready = ready or e
        elif e.name.endswith("sched_switch") and f"prev_pid={loop_tid} " in e.trace:
            ready = e if re.search(r"prev_state=R", e.trace) else None
        elif e.name.endswith("sched_switch") and f"next_pid={loop_tid} " in e.trace:
            if ready is not None and e.t > s.start:
                waits.append((ready, e))
            ready = None
    if not waits:
        return
    ready, ran = max(waits, key=lambda w: w[1].t - w[0].t)
    target = re.search(r"target_cpu=(\d+)", ready.trace)
    cpu = int(target[1]) if target else ready.cpu
    how = "woken" if ready.name.endswith("sched_wakeup") else "preempted"
    print(
        f"  longest wait for a core: runnable ({how}, by {ready.tid}) at "
        f"+{(ready.t - s.start) * 1e3:.1f} ms on CPU {cpu}, ran at "
        f"+{(ran.t - s.start) * 1e3:.1f} ms on CPU {ran.cpu}"
    )
    window = [e for e in events if ready.t <= e.t <= ran.t and e.name == "cpu-clock"]
    held = collections.Counter(e.tid for e in window if e.cpu == cpu)
    for tid, n in held.most_common(2):
        print(f"    CPU {cpu} meanwhile: thread {tid} ({names.get(tid, '?')}), {n} samples")
    idle = collections.Counter(e.cpu for e in window if e.cpu != cpu and e.tid == 0)
    for other, n in sorted(idle.items()):
        print(f"    CPU {other} idle meanwhile: {n} samples")


# --- main -----------------------------------------------------------------------


async def amain(args: argparse.Namespace, workdir: Path) -> tuple[list[Stall], dict[int, str]]:
    """Run the phases; return the stalls and the names of the threads by id."""
    total = int(args.size_gib * GIB)
    state = make_state_a(total, torch.device("cpu"))
    print("the harness's limits for state A (its buffers stay, as there)")
    bench = Bench(run.parse_args(["--dir", str(workdir)]), torch.device("cpu"), workdir)
    bench.log = lambda msg: None  # type: ignore[method-assign]
    bench.limits("A", state)
    await bench.lag_floor("A")
    over = args.over / 1e3
    stalls: list[Stall] = []
    phases = set(args.phases.split(","))
    path = workdir / "stalls.pt"
    if "control" in phases:
        print("control: the harness's copy into fresh memory in a worker thread (no aiostage)")
        pieces = fresh_copy_pieces(bench.bufs["A"])
        for i in range(args.repeat):
            copy = anyio.to_thread.run_sync(copy_into_fresh_mappings, pieces)
            unmap(await watched(f"control #{i}", over, copy, stalls))
            gc.collect()
    if "stage" in phases:
        print("first stage() on fresh stagers")
        for i in range(args.repeat):
            stager = aiostage.DefaultStager()
            await watched(f"stage #{i}", over, stager.stage(state), stalls)
            await stager.close()
            gc.collect()

    async def save(stager: aiostage.DefaultStager) -> None:
        handle = await stager.save(state, path)
        await handle.wait()

    if "save" in phases:
        print("first save() on fresh stagers")
        for i in range(args.repeat):
            remove(path)
            stager = aiostage.DefaultStager()
            await watched(f"save #{i}", over, save(stager), stalls)
            await stager.close()
            gc.collect()
    if "warm" in phases:
        print("warm save() on one stager (after a first one)")
        async with aiostage.DefaultStager() as warm:
            remove(path)
            await save(warm)
            for i in range(args.repeat):
                remove(path)
                gc.collect()
                await watched(f"warm save #{i}", over, save(warm), stalls)
    if "persist" in phases:
        print("persist() of a staged copy (as the harness's A.persist)")
        async with aiostage.DefaultStager() as stager:
            staged = await stager.stage(state)
            for i in range(args.repeat):
                remove(path)
                gc.collect()
                await watched(f"persist #{i}", over, aiostage.persist(staged, path), stalls)
            del staged
    if "load" in phases:
        print("cold load() of the last save")
        if not path.exists():
            async with aiostage.DefaultStager() as stager:
                await save(stager)
        for i in range(args.repeat):
            drop_cache(path)
            loaded = await watched(f"load #{i}", over, aiostage.load(path), stalls)
            del loaded
            gc.collect()
    remove(path)
    bench.drop_limits("A")
    return stalls, {t.native_id: t.name for t in threading.enumerate() if t.native_id}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--over", type=float, default=5.0, help="stalls longer than this (ms)")
    ap.add_argument("--switch-ms", type=float, help="the GIL switch interval to run with (ms)")
    ap.add_argument("--perf", action="store_true", help="explain each stall with perf")
    ap.add_argument(
        "--phases",
        default="control,stage,save,warm,load",
        help="which to run, comma-separated: control, stage, save, warm, persist, load",
    )
    args = ap.parse_args()
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1e3)
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "stalls.perf"
    perf = None
    if args.perf:
        events = ["-e", "cpu-clock", "-e", "sched:sched_switch", "-e", "sched:sched_wakeup"]
        perf = subprocess.Popen(
            [
                "perf",
                "record",
                "-q",
                "-k",
                "CLOCK_MONOTONIC",
                "-F",
                "1999",
                "-g",
                *events,
                "-a",  # all CPUs: who held the loop's core, and whether the other idled
                "-o",
                str(data),
            ],
        )
        time.sleep(1.0)  # let perf attach
    stalls, names = asyncio.run(amain(args, workdir))
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        perf.wait()
        explain(stalls, perf_events(data), threading.get_native_id(), names)
        data.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
