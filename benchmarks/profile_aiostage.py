"""Profiles behind the benchmark's failed targets (not part of the test suite).

Usage::

    python benchmarks/profile_aiostage.py --size-gib 1 --dir /tmp/aiostage-bench [--only NAME]

Sections (``--only`` picks one):

- ``loop``:    cProfile of the event-loop thread during ``stage()`` of the
               20k-tensor state (1st and repeated call), plus the longest
               loop stalls, to see what holds the loop.
- ``copy``:    cost of the CPU copier per segment (``copy_batch``) on the 20k
               state, against a plain loop of ``copy_`` calls.
- ``persist``: the writer's two halves, ``pwrite`` and ``zlib.crc32``, timed
               separately over the same bytes, and persist() itself.
- ``crc``:     models of where the writer's CRC-32 runs (serial, beside the
               pwrite as now, or overlapping the fsync), against a raw write.
- ``save``:    raw write vs stage()+persist() back to back vs pipelined save().
- ``load``:    torch.load (what aiostage.load runs) against reading the same
               bytes into fresh and into touched buffers.
- ``rss``:     RSS over N steps in fresh processes: tensors replaced without
               aiostage, with stage(), with save(), and with save() under a
               pinned glibc mmap threshold; then a tracemalloc diff of Python
               allocations between save 5 and the last of N saves.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import sys
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import LagTicker, lag_stats
from run import (
    GIB,
    IO_CHUNK,
    MIB,
    drop_cache,
    make_state_a,
    make_state_b,
    raw_read,
    raw_write,
    remove,
    state_bytes,
)

import aiostage
from aiostage._stage._cpu_copy import copy_batch
from aiostage._stage._engine import StateDictStager


def top(prof: cProfile.Profile, n: int = 18, key: str = "tottime") -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(n)
    lines = out.getvalue().splitlines()
    start = next(i for i, ln in enumerate(lines) if "ncalls" in ln)
    return "\n".join(lines[start : start + n + 1])


async def section_loop(args: argparse.Namespace) -> None:
    state = make_state_b(args.size_gib, torch.device("cpu"))
    stager = aiostage.DefaultStager()
    for label in ("1st call", "repeated"):
        prof = cProfile.Profile()
        async with LagTicker() as ticker:
            prof.enable()
            t0 = time.perf_counter()
            await stager.stage(state)
            dt = time.perf_counter() - t0
            prof.disable()
        print(f"\n== loop thread during B stage() {label}: {dt:.3f}s, {lag_stats(ticker.lags)}")
        print("   10 longest stalls (ms):", [round(x * 1e3, 1) for x in sorted(ticker.lags)[-10:]])
        print(top(prof))
    await stager.close()


def section_copy(args: argparse.Namespace) -> None:
    state = make_state_b(args.size_gib, torch.device("cpu"))
    eng = StateDictStager()
    gen = eng.plan(state)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        plan = stop.value
    batches = list(plan.batches(16 * MIB))
    t0 = time.perf_counter()
    for b in batches:
        copy_batch(plan.requests, b)
    cold = time.perf_counter() - t0
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for b in batches:
        copy_batch(plan.requests, b)
    prof.disable()
    warm = time.perf_counter() - t0
    segs = sum(len(b.segments) for b in batches)
    small = [r for r in plan.requests if r.nbytes <= 4096]
    pairs = [(r.dst, r.src) for r in small]
    t0 = time.perf_counter()
    for dst, src in pairs:
        dst.copy_(src)
    storage_copy = time.perf_counter() - t0
    dsts = [torch.empty(1024) for _ in small]
    srcs = list(state.values())[: len(small)]
    t0 = time.perf_counter()
    for d, s in zip(dsts, srcs, strict=True):
        d.copy_(s)
    tensor_copy = time.perf_counter() - t0
    print(
        f"\n== copier on B: {len(batches)} batches, {segs} segments; copy_batch total "
        f"{cold:.3f}s (1st) {warm:.3f}s (repeated) = {warm / segs * 1e6:.1f} us/segment"
    )
    print(
        f"   {len(small)} small storages: UntypedStorage.copy_ "
        f"{storage_copy / len(small) * 1e6:.1f} us each (holds the GIL); "
        f"Tensor.copy_ {tensor_copy / len(small) * 1e6:.1f} us each"
    )
    print(top(prof, 12))


async def section_persist(args: argparse.Namespace) -> None:
    """Alternate raw write and persist() a few times; break persist() down by
    wrapping the writer's steps (pickling, each batch write, fsync)."""
    from aiostage._persist import _writer

    state = make_state_a(int(args.size_gib * GIB), torch.device("cpu"))
    nbytes = state_bytes(state)
    stager = aiostage.DefaultStager()
    staged = await stager.stage(state)
    path = Path(args.dir) / "prof-persist.pt"
    raw = Path(args.dir) / "prof-raw.bin"
    views = [memoryview(t.numpy()).cast("B") for t in staged.values()]
    spent: dict[str, float] = {}

    def wrap(name: str, fn: Any) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return inner

    orig = (_writer._write_batch, _writer._prepare, os.fsync)
    _writer._write_batch = wrap("write batches (pwrite + parallel crc)", orig[0])
    _writer._prepare = wrap("pickle + plan", orig[1])
    os.fsync = wrap("fsync", orig[2])
    ratios = []
    try:
        for _ in range(args.rounds):
            remove(raw)
            spent.clear()
            t0 = time.perf_counter()
            fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            off = 0
            for v in views:
                for i in range(0, len(v), 32 * MIB):
                    off += os.pwrite(fd, v[i : i + 32 * MIB], off)
            t_pw = time.perf_counter() - t0
            os.fsync(fd)
            os.close(fd)
            t_write = time.perf_counter() - t0
            raw_fsync = spent.pop("fsync", 0.0)
            t0 = time.perf_counter()
            crc = 0
            for v in views:
                crc = zlib.crc32(v, crc)
            t_crc = time.perf_counter() - t0
            remove(path)
            spent.clear()
            t0 = time.perf_counter()
            await aiostage.persist(staged, path)
            t_persist = time.perf_counter() - t0
            ratios.append(t_persist / t_write)
            parts = ", ".join(f"{k} {v:.3f}s" for k, v in spent.items())
            print(
                f"\n== {nbytes / MIB:.0f} MiB: raw pwrite {t_pw:.3f}s + fsync {raw_fsync:.3f}s "
                f"= {t_write:.3f}s; crc32 alone {t_crc:.3f}s; persist() {t_persist:.3f}s "
                f"= {t_persist / t_write:.2f}x raw\n   persist parts: {parts}; other "
                f"{t_persist - sum(spent.values()):.3f}s"
            )
    finally:
        _writer._write_batch, _writer._prepare, os.fsync = orig
    print(f"   persist / raw write per round: {[round(r, 2) for r in ratios]}")
    remove(path)
    remove(raw)
    await stager.close()


def section_crc(args: argparse.Namespace) -> None:
    """Models of the writer: where the CRC-32 goes relative to write and fsync.

    raw: pwrite + fsync; serial: CRC after each pwrite; parallel: CRC in a
    second thread while pwrite runs (what the writer does now, joined before
    fsync); overlap-fsync: pwrite everything, then CRC in a second thread
    while fsync flushes (headers would be written after, then a tiny fsync).
    """
    from concurrent.futures import ThreadPoolExecutor

    nbytes = int(args.size_gib * GIB)
    tensors = [torch.full((nbytes // 200 // 4,), float(i)) for i in range(200)]
    views = [memoryview(t.numpy()).cast("B") for t in tensors]
    path = Path(args.dir) / "prof-crc.bin"
    pool = ThreadPoolExecutor(1)

    def pwrite_all(fd: int) -> None:
        off = 0
        for v in views:
            off += os.pwrite(fd, v, off)

    def crc_all() -> int:
        c = 0
        for v in views:
            c = zlib.crc32(v, c)
        return c

    modes = ("raw", "serial", "parallel", "overlap-fsync")
    for _ in range(args.rounds):
        res: dict[str, float] = {}
        for mode in modes:
            remove(path)
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            if mode == "raw":
                pwrite_all(fd)
                os.fsync(fd)
            elif mode == "serial":
                off = 0
                for v in views:
                    off += os.pwrite(fd, v, off)
                    zlib.crc32(v)
                os.fsync(fd)
            elif mode == "parallel":
                fut = pool.submit(crc_all)
                pwrite_all(fd)
                fut.result()
                os.fsync(fd)
            else:
                pwrite_all(fd)
                fut = pool.submit(crc_all)
                os.fsync(fd)
                fut.result()
            os.close(fd)
            res[mode] = time.perf_counter() - t0
        print(
            f"== crc models, {nbytes / MIB:.0f} MiB: "
            + ", ".join(f"{k} {v:.3f}s ({v / res['raw']:.2f}x)" for k, v in res.items())
        )
    remove(path)


async def section_save(args: argparse.Namespace) -> None:
    """Is save() pipelined? Alternate raw write, stage()+persist() back to
    back, and save() (warm stager), and compare."""
    state = make_state_a(int(args.size_gib * GIB), torch.device("cpu"))
    nbytes = state_bytes(state)
    stager = aiostage.DefaultStager()
    await stager.stage(state)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    path = Path(args.dir) / "prof-save.pt"
    raw = Path(args.dir) / "prof-raw.bin"
    for _ in range(args.rounds):
        remove(raw)
        t0 = time.perf_counter()
        raw_write(buf, raw)
        t_raw = time.perf_counter() - t0
        remove(path)
        t0 = time.perf_counter()
        staged = await stager.stage(state)
        t_stage = time.perf_counter() - t0
        await aiostage.persist(staged, path)
        t_serial = time.perf_counter() - t0
        del staged
        remove(path)
        t0 = time.perf_counter()
        handle = await stager.save(state, path)
        t_ret = time.perf_counter() - t0
        await handle.wait()
        t_save = time.perf_counter() - t0
        print(
            f"== {nbytes / MIB:.0f} MiB: raw {t_raw:.3f}s; stage {t_stage:.3f}s + persist "
            f"{t_serial - t_stage:.3f}s = {t_serial:.3f}s; save() {t_save:.3f}s (returned after "
            f"{t_ret:.3f}s) = {t_save / t_raw:.2f}x raw, {t_save / t_serial:.2f}x serial"
        )
    remove(path)
    remove(raw)
    await stager.close()


def fsize(path: Path) -> int:
    return os.stat(path).st_size


async def section_load(args: argparse.Namespace) -> None:
    state = make_state_a(int(args.size_gib * GIB), torch.device("cpu"))
    nbytes = state_bytes(state)
    path = Path(args.dir) / "prof-load.pt"
    await aiostage.persist(state, path)
    del state
    gc.collect()
    size = fsize(path)
    touched = torch.ones(size, dtype=torch.uint8)
    for cache in ("cold", "warm", "cold", "warm"):
        res: dict[str, float] = {}
        for name in ("torch.load", "aiostage.load", "read->fresh", "read->touched", "mmap+copy"):
            if cache == "cold":
                drop_cache(path)
            else:
                raw_read(torch.empty(size, dtype=torch.uint8), path)
            t0 = time.perf_counter()
            if name == "torch.load":
                prof = cProfile.Profile()
                prof.enable()
                out: Any = torch.load(path, weights_only=True)
                prof.disable()
            elif name == "aiostage.load":
                out = await aiostage.load(path)
            elif name == "read->fresh":
                out = torch.empty(size, dtype=torch.uint8)
                raw_read(out, path)
            elif name == "read->touched":
                raw_read(touched, path)
                out = None
            else:
                m = torch.load(path, weights_only=True, mmap=True)
                out = {k: v.clone() for k, v in m.items()}
            res[name] = time.perf_counter() - t0
            del out
            gc.collect()
        print(
            f"\n== load {nbytes / MIB:.0f} MiB ({cache}): "
            + ", ".join(f"{k} {v:.3f}s ({nbytes / v / 1e9:.2f} GB/s)" for k, v in res.items())
        )
    print(top(prof, 10))
    remove(path)
    _ = IO_CHUNK


def rss_child(mode: str, size_gib: float, saves: int, directory: str) -> list[int]:
    """In this (child) process: RSS (MiB) after each of ``saves`` steps that
    replace 20 of 200 tensors every 5 steps; ``mode`` is what each step does
    with aiostage: nothing, ``stage()`` or ``save()``+``wait()``."""
    from run import rss_bytes

    async def go() -> list[int]:
        total = max(8 * MIB, int(size_gib * GIB / 8))
        state = make_state_a(total, torch.device("cpu"))
        keys = list(state)
        stager = aiostage.DefaultStager()
        out = []
        for step in range(saves):
            if step and step % 5 == 0:
                for k in keys[(step // 5) * 20 % len(keys) :][:20]:
                    state[k] = torch.full_like(state[k], float(step))
            if mode == "stage":
                await stager.stage(state)
            elif mode in ("save", "save-trim"):
                await (await stager.save(state, Path(directory) / "prof-rss-child.pt")).wait()
                if mode == "save-trim":
                    import ctypes

                    ctypes.CDLL("libc.so.6").malloc_trim(0)
            out.append(rss_bytes() // MIB)
        await stager.close()
        return out

    return asyncio.run(go())


def section_rss_modes(args: argparse.Namespace) -> None:
    """RSS growth with and without aiostage, and with glibc's dynamic mmap
    threshold pinned (MALLOC_MMAP_THRESHOLD_), each in a fresh process."""
    import json
    import subprocess

    runs = [
        ("replace tensors only (no aiostage)", "none", {}),
        ("stage() each step", "stage", {}),
        ("save() each step", "save", {}),
        ("save() each step, then malloc_trim(0)", "save-trim", {}),
        (
            "save() each step, MALLOC_MMAP_THRESHOLD_=131072",
            "save",
            {"MALLOC_MMAP_THRESHOLD_": "131072"},
        ),
    ]
    for label, mode, env in runs:
        here = str(Path(__file__).resolve().parent)
        call = f"p.rss_child({mode!r}, {args.size_gib!r}, {args.saves!r}, {args.dir!r})"
        code = (
            f"import json, sys; sys.path.insert(0, {here!r}); import profile_aiostage as p; "
            f"print('RSS', json.dumps({call}))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ | env
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RSS ")), None)
        if line is None:
            print(f"   {label}: failed\n{proc.stderr[-2000:]}")
            continue
        rss = json.loads(line[4:])
        print(
            f"== RSS, {label}: after 5 steps {rss[4]} MiB, last {rss[-1]} MiB "
            f"(+{rss[-1] - rss[4]} MiB); every 5th: {rss[::5]}"
        )


async def section_rss(args: argparse.Namespace) -> None:
    total = max(8 * MIB, int(args.size_gib * GIB / 8))
    state = make_state_a(total, torch.device("cpu"))
    keys = list(state)
    path = Path(args.dir) / "prof-rss.pt"
    stager = aiostage.DefaultStager()
    tracemalloc.start(12)
    snap = None
    for step in range(args.saves):
        if step and step % 5 == 0:
            for k in keys[(step // 5) * 20 % len(keys) :][:20]:
                state[k] = torch.full_like(state[k], float(step))
        await (await stager.save(state, path)).wait()
        if step == 4:
            gc.collect()
            snap = tracemalloc.take_snapshot()
    gc.collect()
    end = tracemalloc.take_snapshot()
    assert snap is not None
    stats = end.compare_to(snap, "traceback")
    grow = sum(s.size_diff for s in stats)
    print(f"\n== Python heap growth from save 5 to {args.saves}: {grow / 1024:.1f} KiB; top:")
    for s in stats[:6]:
        print(f"   {s.size_diff / 1024:+.1f} KiB in {s.count_diff:+d} blocks")
        for line in s.traceback.format()[-8:]:
            print("      " + line)
    await stager.close()
    remove(path)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/aiostage-bench")
    ap.add_argument("--saves", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--only", choices=["loop", "copy", "persist", "crc", "save", "load", "rss"])
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.only in (None, "loop"):
        await section_loop(args)
    if args.only in (None, "copy"):
        section_copy(args)
    if args.only in (None, "persist"):
        await section_persist(args)
    if args.only in (None, "crc"):
        section_crc(args)
    if args.only in (None, "save"):
        await section_save(args)
    if args.only in (None, "load"):
        await section_load(args)
    if args.only in (None, "rss"):
        section_rss_modes(args)
        await section_rss(args)


if __name__ == "__main__":
    asyncio.run(main())
