"""aiostage benchmark harness: every figure in one process run, as ratios.

Usage::

    python benchmarks/run.py --size-gib 1 --dir /tmp/aiostage-bench
    python benchmarks/run.py --quick            # 0.125 GiB smoke run

Measures, on the same synthetic states, the machine's limits (warm memcpy,
raw write + fsync, raw read warm and cold), aiostage (stage, persist, save,
load) with event-loop lag and peak RSS, the alternatives (torch.save,
safetensors, torch.distributed.checkpoint.async_save) and RSS over 40 saves;
then prints a table and the targets as pass/fail, and writes JSON.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import mmap
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _measure import (
    GcWatch,
    LagTicker,
    Phase,
    check_hwm_reset,
    hwm_bytes,
    kdamond_ms,
    lag_stats,
    reset_hwm,
    rss_bytes,
    rss_window,
    steal_ms,
)

import aiostage

GIB = 1024**3
MIB = 1024**2
IO_CHUNK = 64 * MIB
SMALL_COUNT = 20_000
SMALL_BYTES = 4 * 1024

State = dict[str, torch.Tensor]


# --- setup ----------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cpu":
        return dev
    mod = getattr(torch, dev.type, None)
    if mod is None or not mod.is_available():
        print(
            f"!! --device {name}: no such device available here; falling back to CPU "
            "(figures below are CPU figures)",
            file=sys.stderr,
        )
        return torch.device("cpu")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_state_a(total: int, device: torch.device, n: int = 200) -> State:
    """``n`` float32 tensors of equal size adding up to ``total`` bytes."""
    cols = 1024
    rows = max(1, total // n // 4 // cols)
    state = {}
    for i in range(n):
        t = torch.empty((rows, cols), dtype=torch.float32, device=device)
        t.fill_(float(i) + 0.5)
        state[f"layers.{i}.weight"] = t
    return state


def make_state_b(size_gib: float, device: torch.device) -> State:
    """20,000 tensors of 4 KiB plus 4 large ones (64 MiB each per GiB of --size-gib)."""
    state = {}
    small = torch.arange(SMALL_BYTES // 4, dtype=torch.float32)
    for i in range(SMALL_COUNT):
        state[f"blocks.{i}.bias"] = small.to(device, copy=True)
    big_elems = max(1, int(64 * MIB * size_gib) // 4)
    for i in range(4):
        t = torch.empty(big_elems, dtype=torch.float32, device=device)
        t.fill_(float(i))
        state[f"big.{i}.weight"] = t
    return state


def state_bytes(state: State) -> int:
    return sum(t.untyped_storage().nbytes() for t in state.values())


def host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A touched host byte buffer (pinned when the state lives on an accelerator)."""
    pinned = device.type == "cuda"
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    buf.fill_(1)
    return buf


def flat_views(buf: torch.Tensor, state: State) -> list[torch.Tensor]:
    """Views of ``buf`` shaped like each tensor of ``state``, back to back."""
    views = []
    off = 0
    for t in state.values():
        n = t.numel() * t.element_size()
        views.append(buf[off : off + n].view(t.dtype).view(t.shape))
        off += n
    return views


def drop_cache(path: Path) -> None:
    """Evict ``path``'s clean pages from the page cache (a cold read follows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree(path: Path) -> None:
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        if p.is_file():
            drop_cache(p)


def warm_file(path: Path) -> None:
    """Read ``path`` once so that its pages are in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(IO_CHUNK):
            pass


def remove(path: Path) -> None:
    """Delete ``path`` and sync, untimed.

    The disk here is ext4 mounted with ``discard``: freed blocks are trimmed at
    the next journal commit, which the next fsync waits for.  Without the
    sync, whichever timed write came next would pay for trimming the file
    deleted before it.
    """
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    else:
        return
    os.sync()


def settle(fn: Callable[[], Any], min_runs: int = 5, max_runs: int = 30) -> list[float]:
    """Run ``fn`` until the last three runs are within 20% of the best so far
    (at least ``min_runs`` runs).

    On the VMs this runs on, copies into freshly allocated memory stay slow
    (up to 10x) for a few seconds after the first touch; limits measured in
    that window would flatter everything compared with them.
    """
    times: list[float] = []
    for _ in range(max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        best = min(times)
        if len(times) >= min_runs and all(t <= 1.2 * best for t in times[-3:]):
            break
    return times


# --- raw limits -----------------------------------------------------------------


def memcpy_all(views: list[torch.Tensor], state: State, device: torch.device) -> None:
    for dst, src in zip(views, state.values(), strict=True):
        dst.copy_(src, non_blocking=device.type == "cuda")
    sync(device)


def raw_write(buf: torch.Tensor, path: Path) -> None:
    mv = memoryview(buf.numpy())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < len(mv):
            off += os.write(fd, mv[off : off + IO_CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


DIRECT_BLOCK = 4096


def direct_buffer(buf: torch.Tensor) -> memoryview:
    """``buf``'s bytes (rounded down to whole 4 KiB blocks) in page-aligned
    memory, as ``O_DIRECT`` needs."""
    n = buf.numel() // DIRECT_BLOCK * DIRECT_BLOCK
    aligned = mmap.mmap(-1, max(n, DIRECT_BLOCK))
    torch.frombuffer(aligned, dtype=torch.uint8)[:n].copy_(buf.view(torch.uint8)[:n])
    return memoryview(aligned)[:n]


def raw_write_direct(mv: memoryview, path: Path) -> None:
    """The same bytes with ``O_DIRECT`` (past the page cache), 64 MiB per
    ``pwrite``, then ``fsync``: what the device itself takes, the ceiling
    for a writer that skips the page cache as aiostage does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        off = 0
        while off < len(mv):
            off += os.pwrite(fd, mv[off : off + IO_CHUNK], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_io_works(directory: Path) -> bool:
    probe = directory / "direct-probe.bin"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        os.close(fd)
    finally:
        remove(probe)
    return True


def raw_read(buf: torch.Tensor, path: Path) -> None:
    mv = memoryview(buf.numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < len(mv):
            n = os.preadv(fd, [mv[off : off + IO_CHUNK]], off)
            if n == 0:
                raise EOFError(path)
            off += n
    finally:
        os.close(fd)


def fresh_copy_pieces(buf: torch.Tensor) -> list[torch.Tensor]:
    """``buf`` in 200 pieces, state A's tensor size."""
    return list(torch.chunk(buf, 200))


def copy_into_fresh_mappings(pieces: list[torch.Tensor]) -> list[mmap.mmap]:
    """Copy each piece into a new private anonymous mapping (what a first
    stage copies into); the mappings, for :func:`unmap`."""
    maps = []
    for src in pieces:
        fresh = mmap.mmap(-1, src.numel(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        torch.frombuffer(fresh, dtype=torch.uint8).copy_(src)
        maps.append(fresh)
    return maps


def unmap(maps: list[mmap.mmap]) -> None:
    for m in maps:
        m.close()


# --- the harness ----------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, workdir: Path) -> None:
        self.args = args
        self.device = device
        self.dir = workdir
        self.repeat = args.repeat
        self.phases: dict[str, Phase] = {}
        self.refs: dict[str, Callable[[], float]] = {}
        self.bufs: dict[str, torch.Tensor] = {}
        # every measurement of a limit, its own phase's and the paired ones
        self.ref_samples: dict[str, list[float]] = {}
        self.info: dict[str, Any] = {}

    def limit_gbps(self, key: str) -> float:
        """A limit's throughput from the median of all its samples in this run."""
        ph = self.phases[key]
        return ph.nbytes / statistics.median(ph.times + self.ref_samples.get(key, [])) / 1e9

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def phase(self, key: str, name: str, nbytes: int) -> Phase:
        ph = Phase(name, nbytes)
        self.phases[key] = ph
        return ph

    def report(self, ph: Phase) -> None:
        line = f"  {ph.name}: median {ph.median:.3f}s ({ph.gbps:.2f} GB/s)"
        if ph.ticked:
            s = lag_stats(ph.lags)
            line += f", lag max {s['lag_max_ms']:.1f} ms p99 {s['lag_p99_ms']:.2f} ms"
        if ph.peak_rss_delta:
            line += f", peak RSS +{max(ph.peak_rss_delta) / MIB:.0f} MiB"
        if "paired_time_ratio" in ph.extra:
            line += f", time / paired {ph.extra['paired_ref']}: {ph.extra['paired_time_ratio']:.2f}"
        self.log(line)

    # timing drivers

    def time_sync(
        self,
        ph: Phase,
        fn: Callable[[], Any],
        setup: Callable[[], Any] | None = None,
        repeat: int | None = None,
    ) -> None:
        for _ in range(repeat or self.repeat):
            if setup is not None:
                setup()
            gc.collect()
            with rss_window(ph):
                t0 = time.perf_counter()
                fn()
                ph.times.append(time.perf_counter() - t0)
        self.report(ph)

    async def time_async(
        self,
        ph: Phase,
        fn: Callable[[], Awaitable[Any]],
        setup: Callable[[], Any] | None = None,
        after: Callable[[Any], Any] | None = None,
        repeat: int | None = None,
        paired: str | None = None,
        also_paired: str | None = None,
    ) -> None:
        ph.ticked = True
        # (JSON key prefix, limit, its times): the limit, and a second one
        limits: list[tuple[str, str, list[float]]] = [
            (key, ref, [])
            for key, ref in (("paired", paired), ("also_paired", also_paired))
            if ref is not None
        ]
        for _ in range(repeat or self.repeat):
            for _key, ref, ref_times in limits:
                gc.collect()
                ref_times.append(self.refs[ref]())
            if setup is not None:
                res = setup()
                if asyncio.iscoroutine(res):
                    await res
            gc.collect()
            stolen, damon = steal_ms(), kdamond_ms()
            with rss_window(ph), GcWatch() as gcw:
                async with LagTicker() as ticker:
                    t0 = time.perf_counter()
                    out = await fn()
                    ph.times.append(time.perf_counter() - t0)
                ph.lags.extend(ticker.lags)
            # per repeat: the VM's steal time and the longest loop stall
            ph.extra.setdefault("steal_ms", []).append(steal_ms() - stolen)
            # and the CPU time of the kernel's DAMON thread (see kdamond_ms)
            ph.extra.setdefault("kdamond_ms", []).append(round(kdamond_ms() - damon, 1))
            ph.extra.setdefault("lag_max_ms_by_repeat", []).append(
                lag_stats(ticker.lags)["lag_max_ms"]
            )
            for k, v in gcw.stats().items():
                ph.extra[k] = max(v, ph.extra.get(k, 0))
            if after is not None:
                res = after(out)
                if asyncio.iscoroutine(res):
                    await res
            del out
        for key, ref, ref_times in limits:
            # the limit is measured before every repeat and once more after the
            # last: each repeat is compared with the faster of the two around
            # it (this VM's buffered writes stall 3-5x now and then: a mean
            # would let one such stall flatter aiostage)
            ref_times.append(self.refs[ref]())
            ph.extra[f"{key}_ref"] = ref
            ph.extra[f"{key}_ref_s"] = ref_times
            self.ref_samples.setdefault(ref, []).extend(ref_times)
            # >1 means aiostage took longer than its limit around the same time
            ph.extra[f"{key}_time_ratio"] = paired_time_ratio(ph.times, ref_times)
        self.report(ph)

    # phases

    def limits(self, tag: str, state: State) -> None:
        """Measure the machine's limits on ``state`` and keep them as paired
        references: each aiostage repeat is preceded by one repeat of its limit,
        so that a ratio compares two runs a second apart on a noisy machine."""
        nbytes = state_bytes(state)
        buf = host_buffer(nbytes, self.device)
        views = flat_views(buf, state)
        path = self.dir / f"raw-{tag}.bin"
        rbuf = host_buffer(nbytes, torch.device("cpu"))
        self.info[f"{tag}.memcpy_settle_s"] = settle(lambda: memcpy_all(views, state, self.device))

        def timed(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> float:
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def write() -> float:
            return timed(lambda: raw_write(buf, path), setup=lambda: remove(path))

        def read_warm() -> float:
            return timed(lambda: raw_read(rbuf, path), setup=lambda: raw_read(rbuf, path))

        def read_cold() -> float:
            return timed(lambda: raw_read(rbuf, path), setup=lambda: drop_cache(path))

        def copy() -> float:
            # best of two: the first copy after a stage can pay for waking threads
            return min(timed(lambda: memcpy_all(views, state, self.device)) for _ in range(2))

        self.bufs[tag] = buf
        self.refs[f"{tag}.memcpy"] = copy
        self.refs[f"{tag}.raw_write"] = write
        self.refs[f"{tag}.raw_read_warm"] = read_warm
        self.refs[f"{tag}.raw_read_cold"] = read_cold

        def read_cold_fresh() -> float:
            def go() -> None:
                raw_read(torch.empty(nbytes, dtype=torch.uint8), path)

            return timed(go, setup=lambda: drop_cache(path))

        self.refs[f"{tag}.raw_read_cold_fresh"] = read_cold_fresh
        kind = "D2H pinned copy_" if self.device.type != "cpu" else "memcpy (copy_, warm)"
        self.time_sync(
            self.phase(f"{tag}.memcpy", f"{tag}: {kind}", nbytes),
            lambda: memcpy_all(views, state, self.device),
        )
        self.time_sync(
            self.phase(f"{tag}.raw_write", f"{tag}: raw write+fsync", nbytes),
            lambda: raw_write(buf, path),
            setup=lambda: remove(path),
        )
        if tag != "A":
            return
        if direct_io_works(self.dir) and self.device.type == "cpu":
            aligned = direct_buffer(buf)
            dpath = self.dir / f"raw-{tag}-direct.bin"

            def write_direct() -> float:
                return timed(lambda: raw_write_direct(aligned, dpath), setup=lambda: remove(dpath))

            self.refs["A.raw_write_direct"] = write_direct
            self.time_sync(
                self.phase("A.raw_write_direct", "A: raw O_DIRECT write+fsync", len(aligned)),
                lambda: raw_write_direct(aligned, dpath),
                setup=lambda: remove(dpath),
            )
        self.time_sync(
            self.phase("A.raw_read_warm", "A: raw read (page cache)", nbytes),
            lambda: raw_read(rbuf, path),
            setup=lambda: raw_read(rbuf, path),
        )
        self.time_sync(
            self.phase("A.raw_read_cold", "A: raw read (cold, fadvise DONTNEED)", nbytes),
            lambda: raw_read(rbuf, path),
            setup=lambda: drop_cache(path),
        )
        holder: list[torch.Tensor] = []

        def fresh_read() -> None:
            holder.clear()
            fresh = torch.empty(nbytes, dtype=torch.uint8)
            raw_read(fresh, path)
            holder.append(fresh)

        self.time_sync(
            self.phase("A.raw_read_cold_fresh", "A: raw read (cold, into fresh buffer)", nbytes),
            fresh_read,
            setup=lambda: (holder.clear(), drop_cache(path)),
        )
        holder.clear()

    async def lag_floor(self, tag: str) -> None:
        """Loop lag while a worker thread does a plain write+fsync (no aiostage):
        what the kernel's write path alone costs the loop on this machine."""
        path = self.dir / f"raw-{tag}-floor.bin"
        buf = self.bufs[tag]
        await self.time_async(
            self.phase(
                f"{tag}.raw_write_thread", f"{tag}: raw write+fsync in a thread", buf.numel()
            ),
            lambda: anyio.to_thread.run_sync(raw_write, buf, path),
            setup=lambda: remove(path),
        )
        remove(path)

    async def fresh_memory_floor(self, tag: str) -> None:
        """The same for a first stage's memory: the bytes copied in pieces of
        state A's tensor size into new private mappings (what a first stage
        copies into), in a thread.  On a VM whose host backs guest memory
        lazily, first touches of memory can stall the whole VM, the event
        loop with it."""
        pieces = fresh_copy_pieces(self.bufs[tag])
        await self.time_async(
            self.phase(
                f"{tag}.fresh_copy_thread",
                f"{tag}: copy into fresh memory in a thread",
                self.bufs[tag].numel(),
            ),
            lambda: anyio.to_thread.run_sync(copy_into_fresh_mappings, pieces),
            after=unmap,  # untimed, as a first stage's close()
        )

    def drop_limits(self, tag: str) -> None:
        self.bufs.pop(tag, None)
        for key in [k for k in self.refs if k.startswith(f"{tag}.")]:
            del self.refs[key]
        remove(self.dir / f"raw-{tag}.bin")
        remove(self.dir / f"raw-{tag}-direct.bin")
        gc.collect()

    async def stage_phases(self, tag: str, state: State) -> None:
        nbytes = state_bytes(state)

        async def first() -> Any:
            stager = aiostage.DefaultStager()
            staged = await stager.stage(state)
            return stager, staged

        async def close_first(out: Any) -> None:
            await out[0].close()

        await self.time_async(
            self.phase(f"{tag}.stage_first", f"{tag}: aiostage stage() 1st call", nbytes),
            first,
            after=close_first,
        )
        stager = aiostage.DefaultStager()
        staged = await stager.stage(state)  # warm-up: allocates the cache
        before = stager.cache_info()
        ptrs = [t.untyped_storage().data_ptr() for t in staged.values()]
        changed: list[int] = []
        new_storages: list[int] = []

        async def again() -> Any:
            return await stager.stage(state)

        def check(out: Any) -> None:
            now = [t.untyped_storage().data_ptr() for t in out.values()]
            changed.append(sum(a != b for a, b in zip(ptrs, now, strict=True)))
            new_storages.append(stager.cache_info().storages - before.storages)

        ph = self.phase(f"{tag}.stage_warm", f"{tag}: aiostage stage() repeated", nbytes)
        await self.time_async(ph, again, after=check, paired=f"{tag}.memcpy")
        ph.extra.update(
            {
                "cache_storages": before.storages,
                "cache_bytes": before.nbytes,
                "new_storages_max": max(new_storages),
                "moved_storages_max": max(changed),
            }
        )
        self.log(f"  cache {before}, new storages {new_storages}, moved buffers {changed}")
        if tag == "B":
            # The same tensors as a checkpoint is usually built, anew for each
            # call: {"model": ..., "optim": {"state": {i: {...}}}, "step": n}.
            # The optimizer part is one small dict per big tensor.
            bigs = [k for k in state if k.startswith("big.")]

            def checkpoint() -> dict[str, Any]:
                return {
                    "model": dict(state),
                    "optim": {"state": {i: {"step": i, "lr": 0.1} for i in range(len(bigs))}},
                    "step": 3,
                }

            await stager.stage(checkpoint())  # records the nested shape
            await self.time_async(
                self.phase(f"{tag}.stage_nested", f"{tag}: stage() repeated, nested", nbytes),
                lambda: stager.stage(checkpoint()),
                paired=f"{tag}.memcpy",
            )
            # Writing 20,000 tensors: the pickle, the layout and the central
            # directory are per-tensor Python work beside the write.
            path = self.dir / "ckpt-B.pt"
            flat = await stager.stage(state)
            await self.time_async(
                self.phase("B.persist", "B: aiostage persist()", nbytes),
                lambda: aiostage.persist(flat, path),
                setup=lambda: remove(path),
                paired="B.raw_write",
            )
            # Loading 20,000 tensors: aiostage rebuilds the state from the
            # file's state index, torch.load unpickles data.pkl (page cache
            # warm for both).
            await aiostage.persist(state, path)
            warm_file(path)
            self.time_sync(
                self.phase("B.torch_load", "B: torch.load (page cache)", nbytes),
                lambda: torch.load(path),
                repeat=3,
            )
            await self.time_async(
                self.phase("B.load_warm", "B: aiostage load() (page cache)", nbytes),
                lambda: aiostage.load(path),
                repeat=3,
            )
            remove(path)
        if tag == "A":
            # diagnostic: one copy thread leaves a core to the event loop
            one = aiostage.DefaultStager(aiostage.StagingOptions(copy_threads=1))
            await one.stage(state)
            await self.time_async(
                self.phase("A.stage_warm_1t", "A: stage() repeated, copy_threads=1", nbytes),
                lambda: one.stage(state),
                paired="A.memcpy",
            )
            await one.close()
            del one
            await self.persist_save_load(state, stager, staged)
        await stager.close()

    async def persist_save_load(
        self, state: State, stager: aiostage.DefaultStager, staged: Any
    ) -> None:
        nbytes = state_bytes(state)
        path = self.dir / "aiostage-A.pt"
        # the device's own ceiling, where --dir takes O_DIRECT (see limits)
        direct = "A.raw_write_direct" if "A.raw_write_direct" in self.refs else None
        await self.time_async(
            self.phase("A.persist", "A: aiostage persist()", nbytes),
            lambda: aiostage.persist(staged, path),
            setup=lambda: remove(path),
            paired="A.raw_write",
            also_paired=direct,
        )
        await aiostage.persist(staged, path)  # the previous checkpoint for the next row

        async def idle_between_checkpoints() -> None:
            # Training runs between two checkpoints; the old file is freed then.
            await asyncio.sleep(1.0)

        await self.time_async(
            self.phase("A.persist_over", "A: persist() over the previous checkpoint", nbytes),
            lambda: aiostage.persist(staged, path),
            setup=idle_between_checkpoints,
            paired="A.raw_write",
        )
        returned: list[float] = []

        async def save_with(st: aiostage.DefaultStager) -> None:
            t0 = time.perf_counter()
            handle = await st.save(state, path)
            returned.append(time.perf_counter() - t0)
            await handle.wait()

        ph = self.phase("A.save_warm", "A: aiostage save() stage->durable", nbytes)
        await self.time_async(
            ph,
            lambda: save_with(stager),
            setup=lambda: remove(path),
            paired="A.raw_write",
            also_paired=direct,
        )
        ph.extra["returned_after_s_median"] = statistics.median(returned)
        returned.clear()

        fresh_holder: list[aiostage.DefaultStager] = []

        async def save_first() -> None:
            st = aiostage.DefaultStager()
            fresh_holder.append(st)
            await save_with(st)

        async def close_fresh(_: Any) -> None:
            for st in fresh_holder:
                await st.close()
            fresh_holder.clear()

        ph = self.phase("A.save_first", "A: aiostage save() 1st call (fresh stager)", nbytes)
        await self.time_async(ph, save_first, setup=lambda: remove(path), after=close_fresh)
        ph.extra["returned_after_s_median"] = statistics.median(returned)

        # load: the file written by save() above
        await self.time_async(
            self.phase("A.load_cold", "A: aiostage load() (cold)", nbytes),
            lambda: aiostage.load(path),
            setup=lambda: drop_cache(path),
            paired="A.raw_read_cold",
            # Its target: the read into a fresh buffer, which pays the page
            # faults of new memory as the load does.  Measured once among
            # the limits minutes earlier, its cost drifted with the VM's
            # (the fresh memory's first touches: 0.55-3.1 s for 1 GiB).
            also_paired="A.raw_read_cold_fresh",
        )
        await self.time_async(
            self.phase("A.load_warm", "A: aiostage load() (page cache)", nbytes),
            lambda: aiostage.load(path),
            setup=lambda: warm_file(path),
            paired="A.raw_read_warm",
        )
        # load(into=): the restore case, into tensors that already exist
        # (touched): the same memory situation as the raw-read limits.
        into = [await aiostage.load(path)]
        await self.time_async(
            self.phase("A.load_into_cold", "A: aiostage load(into=) (cold)", nbytes),
            lambda: aiostage.load(path, into=into[0]),
            setup=lambda: drop_cache(path),
            paired="A.raw_read_cold",
        )
        await self.time_async(
            self.phase("A.load_into_warm", "A: aiostage load(into=) (page cache)", nbytes),
            lambda: aiostage.load(path, into=into[0]),
            setup=lambda: warm_file(path),
            paired="A.raw_read_warm",
        )
        into.clear()
        touch_times: list[float] = []

        def touch(loaded: Any) -> None:
            t0 = time.perf_counter()
            for t in loaded.values():
                t.sum()
            touch_times.append(time.perf_counter() - t0)

        ph = self.phase("A.load_mmap", "A: aiostage load(mmap=True) (cold, call only)", nbytes)
        # The call takes 20-30 ms: three times the repeats, so that its p99
        # lag rests on a few hundred ticks (over fewer than 100, the p99 of
        # the samples is their maximum).
        await self.time_async(
            ph,
            lambda: aiostage.load(path, mmap=True),
            setup=lambda: drop_cache(path),
            after=touch,
            repeat=3 * self.repeat,
        )
        ph.extra["touch_all_s_median"] = statistics.median(touch_times)
        ph.extra["call_plus_touch_gbps"] = (
            nbytes / (ph.median + ph.extra["touch_all_s_median"]) / 1e9
        )
        remove(path)

    def run_child(self, kind: str) -> dict[str, Any]:
        """Run an RSS phase in a fresh interpreter, so that memory freed by
        earlier phases (and kept by the allocator) cannot hide growth."""
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            kind,
            "--size-gib",
            str(self.args.size_gib),
            "--dir",
            str(self.dir),
            "--saves",
            str(self.args.saves),
            "--device",
            str(self.device),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("CHILD_JSON "):
                return dict(json.loads(line[len("CHILD_JSON ") :]))
        raise RuntimeError(f"child {kind} failed:\n{proc.stdout}\n{proc.stderr}")

    def rss_phases(self) -> None:
        r = self.run_child("save-peak")
        self.info["save_peak_rss"] = r
        self.log(
            f"  1st save() of {r['state_bytes'] / MIB:.0f} MiB in a fresh process: RSS "
            f"{r['rss_base'] / MIB:.0f} MiB (imports) -> {r['rss_with_state'] / MIB:.0f} "
            f"(state) -> peak {r['peak_first'] / MIB:.0f}; 2nd save() peak "
            f"+{(r['peak_second'] - r['rss_before_second']) / MIB:.0f} MiB"
        )
        r = self.run_child("saves")
        self.info["rss_over_saves"] = r
        self.log(
            f"  RSS over {r['saves']} saves of {r['state_bytes'] / MIB:.0f} MiB: first "
            f"{r['rss_first_mib']:.0f} MiB, after warm-up {r['rss_after_warmup_mib']:.0f}, "
            f"last {r['rss_last_mib']:.0f}, max growth {r['max_growth_after_warmup_mib']:.1f} "
            f"MiB, slope {r['slope_mib_per_save']:.2f} MiB/save"
        )

    # alternatives

    def alternatives(self, state: State) -> None:
        nbytes = state_bytes(state)
        path = self.dir / "alt.bin"

        def torch_save() -> None:
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        self.time_sync(
            self.phase("A.torch_save", "A: torch.save + fsync", nbytes),
            torch_save,
            setup=lambda: remove(path),
        )
        try:
            from safetensors.torch import save_file
        except ImportError:
            self.log("  safetensors not installed: skipped")
        else:

            def st_save() -> None:
                save_file(state, str(path))
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

            self.time_sync(
                self.phase("A.safetensors", "A: safetensors save_file + fsync", nbytes),
                st_save,
                setup=lambda: remove(path),
            )
        remove(path)
        if not self.args.no_dcp:
            self.dcp(state)

    def dcp(self, state: State) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import staging

        nbytes = state_bytes(state)
        ckpt = self.dir / "dcp"
        owns_pg = False
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
            )
            owns_pg = True
        accel = self.device.type != "cpu"
        options = staging.StagingOptions(
            use_pinned_memory=accel,
            use_shared_memory=False,
            use_async_staging=True,
            use_non_blocking_copy=accel,
        )
        stager = staging.DefaultStager(options)
        blocked: list[float] = []

        def save() -> None:
            t0 = time.perf_counter()
            resp = dcp.async_save(state, checkpoint_id=str(ckpt), async_stager=stager)
            blocked.append(time.perf_counter() - t0)
            fut = getattr(resp, "upload_completion", resp)
            fut.result()

        try:
            t0 = time.perf_counter()
            save()  # warm-up (plans, allocates the staging buffers)
            first = time.perf_counter() - t0
            blocked.clear()
            ph = self.phase("A.dcp", "A: dcp.async_save total (DefaultStager)", nbytes)
            self.time_sync(ph, save, setup=lambda: remove(ckpt))
            ph.extra["returned_after_s_median"] = statistics.median(blocked)
            ph.extra["first_call_s"] = first
            self.log(f"  dcp 1st call {first:.3f}s; returned after {min(blocked):.3f}s")
        finally:
            stager.close()
            remove(ckpt)
            if owns_pg:
                dist.destroy_process_group()

    async def idle_lag(self) -> None:
        async with LagTicker() as ticker:
            await asyncio.sleep(1.0)
        self.info["idle_loop_lag"] = lag_stats(ticker.lags)
        self.log(f"  idle loop lag: {self.info['idle_loop_lag']}")


# --- child processes (RSS) -------------------------------------------------------


async def child_save_peak(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Peak RSS of a first and a second save() of state A, in this fresh process."""
    path = Path(args.dir) / "aiostage-rss.pt"
    gc.collect()
    rss_base = rss_bytes()
    state = make_state_a(int(args.size_gib * GIB), device)
    sync(device)
    gc.collect()
    rss_with_state = rss_bytes()
    stager = aiostage.DefaultStager()
    reset_hwm()
    t0 = time.perf_counter()
    handle = await stager.save(state, path)
    await handle.wait()
    first_s = time.perf_counter() - t0
    peak_first = hwm_bytes()
    del handle
    gc.collect()
    rss_before_second = rss_bytes()
    reset_hwm()
    await (await stager.save(state, path)).wait()
    peak_second = hwm_bytes()
    staged = stager.cache_info().nbytes
    await stager.close()
    remove(path)
    return {
        "state_bytes": state_bytes(state),
        "staged_bytes": staged,
        "rss_base": rss_base,
        "rss_with_state": rss_with_state,
        "peak_first": peak_first,
        "first_save_s": first_s,
        "rss_before_second": rss_before_second,
        "peak_second": peak_second,
    }


async def child_saves(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """RSS after each of N saves of a changing state (tensors replaced every 5 steps)."""
    total = max(8 * MIB, int(args.size_gib * GIB / 8))
    state = make_state_a(total, device)
    keys = list(state)
    nbytes = state_bytes(state)
    path = Path(args.dir) / "aiostage-rss-steps.pt"
    stager = aiostage.DefaultStager()
    rss: list[int] = []
    lags: list[float] = []
    gc.collect()
    rss0 = rss_bytes()
    for step in range(args.saves):
        if step and step % 5 == 0:
            # replace a different 10% of the tensors with new ones
            for k in keys[(step // 5) * 20 % len(keys) :][:20]:
                state[k] = torch.full_like(state[k], float(step))
        for t in list(state.values())[::10]:
            t.add_(1.0)
        async with LagTicker() as ticker:
            handle = await stager.save(state, path)
            await handle.wait()
        lags.extend(ticker.lags)
        del handle
        rss.append(rss_bytes())
    cached = stager.cache_info()
    await stager.close()
    remove(path)
    warm = 5
    base = rss[warm - 1]
    after = rss[warm:]
    xs = list(range(len(after)))
    slope = statistics.linear_regression(xs, [r / MIB for r in after]).slope
    return {
        "saves": args.saves,
        "state_bytes": nbytes,
        "cache_storages_end": cached.storages,
        "cache_bytes_end": cached.nbytes,
        "rss_before_mib": rss0 / MIB,
        "rss_first_mib": rss[0] / MIB,
        "rss_after_warmup_mib": base / MIB,
        "rss_last_mib": rss[-1] / MIB,
        "max_growth_after_warmup_mib": (max(after) - base) / MIB,
        "slope_mib_per_save": slope,
        "rss_mib": [r / MIB for r in rss],
        **lag_stats(lags),
    }


# --- targets & table ------------------------------------------------------------


def evaluate(b: Bench) -> list[dict[str, Any]]:
    p = b.phases
    rows: list[dict[str, Any]] = []

    def row(name: str, value: float, limit: float, ok: bool, note: str = "") -> None:
        rows.append(
            {"target": name, "value": value, "limit": limit, "pass": bool(ok), "note": note}
        )

    def at_least(name: str, value: float, limit: float, note: str = "") -> None:
        row(name, value, limit, value >= limit, note)

    for key in (
        "A.stage_first",
        "A.stage_warm",
        "A.persist",
        "A.save_warm",
        "A.save_first",
        "A.load_cold",
        "A.load_warm",
        "A.load_mmap",
    ):
        if key in p:
            s = lag_stats(p[key].lags)
            row(f"loop lag max, {p[key].name} (ms)", s["lag_max_ms"], 10.0, s["lag_max_ms"] <= 10)
            row(f"loop lag p99, {p[key].name} (ms)", s["lag_p99_ms"], 2.0, s["lag_p99_ms"] <= 2)
            stolen = p[key].extra.get("steal_ms", [])
            by_repeat = p[key].extra.get("lag_max_ms_by_repeat", [])
            unstolen = [lag for lag, st in zip(by_repeat, stolen, strict=True) if st == 0]
            if any(stolen) and unstolen:
                v = max(unstolen)
                row(
                    f"(info) loop lag max, {p[key].name}, repeats without VM steal (ms)",
                    v,
                    10.0,
                    v <= 10,
                    f"{len(unstolen)} of {len(stolen)} repeats; steal "
                    + "/".join(f"{x:.0f}" for x in stolen)
                    + " ms; kdamond "
                    + "/".join(f"{x:.0f}" for x in p[key].extra.get("kdamond_ms", []))
                    + " ms",
                )
    if "A.fresh_copy_thread" in p:
        s = lag_stats(p["A.fresh_copy_thread"].lags)
        row(
            "(info) loop lag max, a copy into fresh memory in a thread, no aiostage (ms)",
            s["lag_max_ms"],
            10.0,
            s["lag_max_ms"] <= 10,
            "the machine's own stalls on first touches of memory",
        )
    if "A.stage_warm" in p:
        r = paired_throughput(p["A.stage_warm"])
        row("stage() repeated / warm memcpy bandwidth (paired)", r, 0.8, r >= 0.8)
        n = (
            p["A.stage_warm"].extra["new_storages_max"]
            + p["A.stage_warm"].extra["moved_storages_max"]
        )
        row("new or moved storages on repeated stage()", n, 0, n == 0)
    if "A.persist" in p:
        r = paired_throughput(p["A.persist"])
        row("persist() / raw write+fsync throughput (paired)", r, 0.9, r >= 0.9)
        if "also_paired_time_ratio" in p["A.persist"].extra:
            at_least(
                "(info) persist() / raw O_DIRECT write+fsync throughput (paired)",
                paired_throughput(p["A.persist"], "also_paired_time_ratio"),
                0.9,
                "the device's own ceiling, past the page cache",
            )
    if "A.persist_over" in p:
        at_least(
            "(info) persist() over the previous checkpoint / raw write+fsync (paired)",
            paired_throughput(p["A.persist_over"]),
            0.9,
            "the raw write's file is removed untimed; persist replaces its own",
        )
    if "A.save_warm" in p:
        r = p["A.save_warm"].extra["paired_time_ratio"]
        row("save() stage->durable / raw write+fsync time (paired)", r, 1.1, r <= 1.1)
        if "also_paired_time_ratio" in p["A.save_warm"].extra:
            r = p["A.save_warm"].extra["also_paired_time_ratio"]
            row(
                "(info) save() stage->durable / raw O_DIRECT write+fsync time (paired)",
                r,
                1.1,
                r <= 1.1,
                "the device's own ceiling, past the page cache",
            )
        if "A.dcp" in p:
            r = p["A.save_warm"].median / p["A.dcp"].median
            row("save() stage->durable / dcp.async_save total", r, 0.5, r <= 0.5)
            if "A.save_first" in p and "first_call_s" in p["A.dcp"].extra:
                r = p["A.save_first"].median / p["A.dcp"].extra["first_call_s"]
                row(
                    "(info) save() 1st call / dcp.async_save 1st call",
                    r,
                    0.5,
                    r <= 0.5,
                    "both with fresh staging buffers",
                )
    if "A.load_into_cold" in p:
        r = paired_throughput(p["A.load_into_cold"])
        row("load(into=) cold / raw read cold throughput (paired)", r, 0.8, r >= 0.8)
        r = paired_throughput(p["A.load_into_warm"])
        row("load(into=) warm / raw read warm throughput (paired)", r, 0.8, r >= 0.8)
    if "A.load_cold" in p and "also_paired_time_ratio" in p["A.load_cold"].extra:
        at_least(
            "load() cold / raw read cold into a fresh buffer (paired)",
            paired_throughput(p["A.load_cold"], "also_paired_time_ratio"),
            0.8,
            "both allocate the memory they read into",
        )
    if "A.load_cold" in p:
        for kind in ("cold", "warm"):
            at_least(
                f"(info) load() {kind} / raw read {kind} into touched memory (paired)",
                paired_throughput(p[f"A.load_{kind}"]),
                0.8,
                "page faults of fresh memory vs none",
            )
    if "B.persist" in p:
        at_least(
            "(info) B persist() / raw write+fsync throughput, 20k tensors (paired)",
            paired_throughput(p["B.persist"]),
            0.9,
            "the pickle and the directory: per-tensor work beside the write",
        )
        lag = lag_stats(p["B.persist"].lags)["lag_max_ms"]
        row(
            "(info) loop lag max, B: aiostage persist(), 20k tensors (ms)",
            lag,
            10.0,
            lag <= 10,
            "young collections of the writer's records (20,000 tensors)",
        )
    if "B.stage_warm" in p and "A.stage_warm" in p:
        per_a = p["A.stage_warm"].median / p["A.stage_warm"].nbytes
        per_b = p["B.stage_warm"].median / p["B.stage_warm"].nbytes
        r = per_b / per_a
        row("20k-tensor stage() time per byte / 200-tensor", r, 3.0, r <= 3)
    # (info) median time of one phase over another's, at most ``limit``
    for key, over, name, limit, note in (
        (
            "B.load_warm",
            "B.torch_load",
            "B load() / torch.load time, 20k tensors (page cache)",
            1.0,
            "aiostage from its state index, torch unpickling",
        ),
        (
            "B.stage_nested",
            "B.stage_warm",
            "B nested in a checkpoint dict / B flat, repeated stage() time",
            1.2,
            "the replay covers nested states",
        ),
    ):
        if key in p and over in p:
            r = p[key].median / p[over].median
            row(f"(info) {name}", r, limit, r <= limit, note)
    if "save_peak_rss" in b.info:
        r = b.info["save_peak_rss"]
        # peak RSS over the interpreter's own RSS (imports, before the state
        # existed) must fit state + staged bytes + 10%.
        allowed = 1.1 * (r["state_bytes"] + r["staged_bytes"])
        used = r["peak_first"] - r["rss_base"]
        row(
            "peak RSS during 1st save() / 1.1 x (state + staged bytes)",
            used / allowed,
            1.0,
            used <= allowed,
            f"peak {used / MIB:.0f} MiB over the interpreter; state "
            f"{r['state_bytes'] / MIB:.0f} MiB, staged {r['staged_bytes'] / MIB:.0f} MiB",
        )
    if "rss_over_saves" in b.info:
        r = b.info["rss_over_saves"]
        frac = r["max_growth_after_warmup_mib"] * MIB / r["state_bytes"]
        row(
            f"RSS growth over {r['saves']} saves after warm-up / state bytes",
            frac,
            0.1,
            frac <= 0.1,
            f"{r['rss_after_warmup_mib']:.0f} -> {r['rss_last_mib']:.0f} MiB, "
            f"slope {r['slope_mib_per_save']:.2f} MiB/save",
        )
    return rows


def paired_time_ratio(times: list[float], ref_times: list[float]) -> float:
    """The median of each repeat's time over the faster of the limit's two
    measurements around it (``ref_times`` has one more than ``times``)."""
    return statistics.median(
        t / min(r0, r1) for t, r0, r1 in zip(times, ref_times, ref_times[1:], strict=False)
    )


def paired_throughput(ph: Phase, key: str = "paired_time_ratio") -> float:
    """aiostage throughput / its limit's, median over repeats paired in time
    (``key="also_paired_time_ratio"``: against the phase's second limit)."""
    return 1.0 / float(ph.extra[key])


def ratio_rows(b: Bench) -> list[tuple[str, str]]:
    """(phase key, reference key) for the ratio column of the table."""
    p = b.phases
    ref = {
        "stage_first": "memcpy",
        "stage_warm": "memcpy",
        "stage_nested": "memcpy",
        "persist": "raw_write",
        "persist_over": "raw_write",
        "save_warm": "raw_write",
        "save_first": "raw_write",
        "torch_save": "raw_write",
        "safetensors": "raw_write",
        "dcp": "raw_write",
        "load_cold": "raw_read_cold",
        "load_warm": "raw_read_warm",
        "load_mmap": "raw_read_cold",
        "raw_read_cold_fresh": "raw_read_cold",
        "raw_write_direct": "raw_write",
    }
    out = []
    for key in p:
        tag, name = key.split(".", 1)
        r = ref.get(name)
        out.append((key, f"{tag}.{r}" if r and f"{tag}.{r}" in p else ""))
    return out


def print_table(b: Bench, targets: list[dict[str, Any]]) -> None:
    print()
    hdr = (
        f"{'phase':52s} {'median s':>9s} {'min':>7s} {'max':>7s} {'GB/s':>6s} "
        f"{'x limit':>8s} {'lag max':>8s} {'p99':>6s} {'gc max':>6s} {'RSS+MiB':>8s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for key, ref in ratio_rows(b):
        ph = b.phases[key]
        ratio = ""
        if "paired_time_ratio" in ph.extra:
            ratio = f"{paired_throughput(ph):.2f}p"
        elif ref:
            ratio = f"{ph.gbps / b.limit_gbps(ref):.2f}"
        lag_max = lag_p99 = rss = gcmax = ""
        if "gc_max_ms" in ph.extra:
            gcmax = f"{ph.extra['gc_max_ms']:.0f}"
        if ph.ticked:
            lag = lag_stats(ph.lags)
            lag_max, lag_p99 = f"{lag['lag_max_ms']:.1f}", f"{lag['lag_p99_ms']:.2f}"
        if ph.peak_rss_delta:
            rss = f"{max(ph.peak_rss_delta) / MIB:.0f}"
        print(
            f"{ph.name[:52]:52s} {ph.median:9.3f} {min(ph.times):7.3f} {max(ph.times):7.3f} "
            f"{ph.gbps:6.2f} {ratio:>8s} {lag_max:>8s} {lag_p99:>6s} {gcmax:>6s} {rss:>8s}"
        )
    print("\nlimits, median over all their samples in this run (own rows + paired):")
    for key in b.ref_samples:
        n = len(b.phases[key].times) + len(b.ref_samples[key])
        print(f"  {b.phases[key].name}: {b.limit_gbps(key):.2f} GB/s over {n} samples")
    print(
        "\n'x limit' = throughput / the matching limit of the same run (memcpy for stage, "
        "raw write+fsync for writers, raw read for loads; unpaired rows use the limit's "
        "median over all its samples); 'p' = median of per-repeat ratios "
        "with the limit re-measured around each repeat; lag and gc max (longest garbage "
        "collection) in ms; RSS+ = peak RSS growth during the call."
    )
    print()
    print(f"{'target':70s} {'value':>8s} {'limit':>7s}  result")
    for t in targets:
        print(
            f"{t['target'][:70]:70s} {t['value']:8.3f} {t['limit']:7.2f}  "
            f"{'PASS' if t['pass'] else 'FAIL'}  {t['note']}"
        )
    counted = [t for t in targets if not t["target"].startswith("(info)")]
    passed = sum(t["pass"] for t in counted)
    print(f"\n{passed}/{len(counted)} targets pass ((info) rows not counted)")


def machine_info(workdir: Path) -> dict[str, Any]:
    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    mem = ""
    with open("/proc/meminfo") as f:
        mem = f.readline().strip()
    root = Path(__file__).resolve().parent.parent
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "meminfo": mem,
        "df": cmd("df", "-hT", str(workdir)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "aiostage": aiostage.__version__,
        "git": cmd("git", "-C", str(root), "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(cmd("git", "-C", str(root), "status", "--porcelain", "aiostage")),
        "loadavg": os.getloadavg(),
    }


# --- main -----------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if args.child:
        fn = child_save_peak if args.child == "save-peak" else child_saves
        print("CHILD_JSON " + json.dumps(await fn(args, device)), flush=True)
        return 0
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="aiostage-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    b = Bench(args, device, workdir)
    b.info["machine"] = machine_info(workdir)
    b.info["args"] = vars(args) | {"device_used": str(device)}
    b.log(f"machine: {b.info['machine']}")
    b.info["hwm_reset_check"] = check_hwm_reset()
    b.log(f"VmHWM reset check: {b.info['hwm_reset_check']}")
    if not b.info["hwm_reset_check"]["works"]:
        b.log("!! clear_refs does not reset VmHWM here: peak RSS figures are upper bounds")
    await b.idle_lag()

    total = int(args.size_gib * GIB)
    b.log(f"state A: {total / MIB:.0f} MiB in 200 float32 tensors on {device}")
    state_a = make_state_a(total, device)
    b.log("limits (A)")
    b.limits("A", state_a)
    await b.lag_floor("A")
    await b.fresh_memory_floor("A")
    b.log("aiostage (A)")
    await b.stage_phases("A", state_a)
    b.drop_limits("A")
    if not args.no_alternatives:
        b.log("alternatives (A)")
        b.alternatives(state_a)
    del state_a
    gc.collect()

    b.log(f"state B: {SMALL_COUNT} x 4 KiB + 4 large")
    state_b = make_state_b(args.size_gib, device)
    b.limits("B", state_b)
    await b.stage_phases("B", state_b)
    b.drop_limits("B")
    del state_b
    gc.collect()
    b.log(f"RSS in fresh processes: 1st save() peak, then {args.saves} saves")
    b.rss_phases()

    b.info["loadavg_end"] = os.getloadavg()
    targets = evaluate(b)
    print_table(b, targets)
    b.info["limits_all_samples_gbps"] = {k: b.limit_gbps(k) for k in b.ref_samples}
    out = {
        "info": b.info,
        "phases": {k: ph.to_json() for k, ph in b.phases.items()},
        "targets": targets,
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:  # noqa: ASYNC230 - once, at the end
        json.dump(out, f, indent=1, default=str)
    b.log(f"wrote {json_path}")
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0, help="size of state A (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --size-gib 0.125")
    ap.add_argument("--dir", default=None, help="directory for files (default: a temp dir)")
    ap.add_argument("--json", default=str(here / "results.json"), help="JSON output path")
    ap.add_argument("--repeat", type=int, default=3, help="repeats per timed phase (median)")
    ap.add_argument("--device", default="cpu", help="where states live: cpu, cuda, cuda:1")
    ap.add_argument("--saves", type=int, default=40, help="saves in the RSS-over-saves phase")
    ap.add_argument("--no-dcp", action="store_true", help="skip dcp.async_save")
    ap.add_argument("--no-alternatives", action="store_true", help="skip the alternatives")
    ap.add_argument("--child", choices=["save-peak", "saves"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size_gib = 0.125
    if args.saves < 6:
        ap.error("--saves must be at least 6 (5 warm-up saves)")
    return args


def main() -> int:
    args = parse_args()
    warnings.simplefilter("default")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
