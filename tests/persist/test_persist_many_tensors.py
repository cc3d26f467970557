"""Persisting 50,000 tiny tensors never holds the event loop for long."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from _ticker import LoopTicker

import aiostage
from aiostage._persist import _writer

COUNT = 50_000


@contextlib.contextmanager
def frozen_state(count: int) -> Iterator[dict[str, Any]]:
    """``count`` tiny tensors, with the heap frozen afterwards.

    A full collection of the cyclic GC scans every tracked object in the
    process, so with this many objects alive it pauses whatever runs, with or
    without aiostage; freezing the heap built before the test (as trainers do
    after set-up) leaves the lag that persisting causes.
    """
    state = {f"layer{i}.w": torch.full((2,), float(i)) for i in range(count)}
    gc.collect()
    gc.freeze()
    try:
        yield state
    finally:
        gc.unfreeze()


@pytest.fixture
def fifty_k_state() -> Iterator[dict[str, Any]]:
    with frozen_state(COUNT) as state:
        yield state


@pytest.mark.slow
async def test_loop_runs_while_persisting_fifty_thousand_tensors(
    tmp_path: Path, fifty_k_state: dict[str, Any]
) -> None:
    ready: list[torch.UntypedStorage] = []

    async def wait_ready(storage: torch.UntypedStorage) -> None:
        ready.append(storage)  # already staged: returns without suspending

    start = time.perf_counter()
    async with LoopTicker() as ticker:
        path = await aiostage.persist(fifty_k_state, tmp_path / "many.pt", wait_ready=wait_ready)
    elapsed = time.perf_counter() - start
    print(f"persist 50k tensors: {elapsed:.3f}s, max loop gap {ticker.max_gap * 1e3:.1f} ms")
    assert len(ready) == COUNT
    # Generous: batching, waiting for 50k storages and building the 3 MB
    # central directory in one loop step each took ~0.3 s apiece.
    assert ticker.max_gap < 0.25
    assert ticker.ticks > 10
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert len(loaded) == COUNT
    assert torch.equal(loaded[f"layer{COUNT - 1}.w"], fifty_k_state[f"layer{COUNT - 1}.w"])


def test_batches_cap_pieces_and_bytes() -> None:
    records = [
        _writer._archive.StorageRecord(key=str(i), storage=torch.UntypedStorage(n), nbytes=n)
        for i, n in enumerate([8] * 1000 + [0, 10_000, 8])
    ]
    batches = _writer._batches(records, 4096, 256)
    assert all(len(b) <= 256 for b in batches)
    assert all(sum(p.end - p.start for p in b) <= 4096 for b in batches)
    pieces = [p for b in batches for p in b]
    # Every storage, in order, whole: each piece starts where the last ended.
    for rec in records:
        mine = [p for p in pieces if p.rec is rec]
        assert mine[0].start == 0 and mine[-1].end == rec.nbytes
        assert all(a.end == b.start for a, b in itertools.pairwise(mine))


async def test_batching_and_central_directory_are_built_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    threads: dict[str, int] = {}
    batches = _writer._batches
    tail_bytes = _writer._archive.ArchivePlan.tail_bytes

    def spy_batches(*args: Any) -> Any:
        threads["batches"] = threading.get_ident()
        return batches(*args)

    def spy_tail(plan: Any) -> bytes:
        threads["tail"] = threading.get_ident()
        return tail_bytes(plan)

    monkeypatch.setattr(_writer, "_batches", spy_batches)
    monkeypatch.setattr(_writer._archive.ArchivePlan, "tail_bytes", spy_tail)
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(10)}
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    assert set(threads) == {"batches", "tail"}
    assert loop_thread not in threads.values()
    assert torch.equal((await aiostage.load(path, verify=True))["t9"], state["t9"])


@pytest.mark.parametrize("direct_io", [True, False])
async def test_small_records_go_out_with_their_headers_a_run_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: bool
) -> None:
    """A small record's bytes and its local header were two writes (the
    header once the CRC thread had the CRC): 40,000 system calls for 20,000
    records.  The writer checksums small records itself and writes a run of
    them, headers included, in one call; the CRC thread never sees them."""
    writes: list[int] = []
    real_write = _writer._atomic.write_all

    def write_all(fd: int, data: bytes, offset: int) -> None:
        writes.append(len(data))
        real_write(fd, data, offset)

    folded: list[int] = []
    real_crc = _writer._crc_pieces

    def crc_pieces(batch: list[Any]) -> None:
        folded.extend(p.rec.nbytes for p in batch if p.end > p.start and not p.inline)
        real_crc(batch)

    monkeypatch.setattr(_writer._atomic, "write_all", write_all)
    monkeypatch.setattr(_writer, "_crc_pieces", crc_pieces)
    state: dict[str, Any] = {f"t{i}": torch.full((100,), float(i)) for i in range(600)}
    state["big"] = torch.arange(float(2**18))  # 1 MiB: checksummed by the CRC thread
    state["tail"] = [torch.ones(3), torch.zeros(0)]  # (an empty record too)
    path = await aiostage.persist(state, tmp_path / "small.pt", direct_io=direct_io)
    assert len(writes) < 30  # (600 records: 3 batches of at most 256)
    assert folded == [2**20]  # only the large record
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every CRC-32 matches
    loaded = await aiostage.load(path, verify=True)
    assert all(torch.equal(loaded[k], state[k]) for k in ("t0", "t599", "big"))
    assert torch.equal(loaded["tail"][0], torch.ones(3)) and loaded["tail"][1].numel() == 0


async def test_wait_ready_calls_per_loop_step_are_bounded(tmp_path: Path) -> None:
    """A ``wait_ready`` that does not suspend must not let one loop step run
    through every storage: the loop gets a turn at least every batch."""
    count = 3 * _writer.MAX_BATCH_PIECES + 17
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(count)}
    calls = 0
    most = 0

    async def wait_ready(storage: torch.UntypedStorage) -> None:
        nonlocal calls
        calls += 1

    async def watch(stop: anyio.Event) -> None:
        nonlocal most
        last = calls
        while not stop.is_set():
            await asyncio.sleep(0)  # one loop turn
            most = max(most, calls - last)
            last = calls

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, stop)
        await aiostage.persist(state, tmp_path / "ckpt.pt", wait_ready=wait_ready)
        stop.set()
    assert calls == count
    assert 0 < most <= _writer.MAX_BATCH_PIECES


async def test_async_progress_is_rejected(tmp_path: Path) -> None:
    async def progress(done: int, total: int) -> None:
        pass

    with pytest.raises(TypeError, match="progress"):
        await aiostage.persist({"a": torch.ones(2)}, tmp_path / "c.pt", progress=progress)  # type: ignore[arg-type]
    assert not os.listdir(tmp_path)  # refused before anything was written


async def test_pickling_and_laying_out_many_tensors_hand_the_gil_to_the_loop(
    tmp_path: Path,
) -> None:
    """The writer's pure-Python steps (pickling, the archive's layout, the
    write batches, the central directory) run in a worker thread and hand
    the GIL over every millisecond.  Without that the loop waits a whole
    switch interval each time it wants the GIL; the switch interval is
    raised to 0.1 s here so that such a wait cannot pass for noise."""
    before = sys.getswitchinterval()
    with frozen_state(10_000) as state:
        sys.setswitchinterval(0.1)
        try:
            async with LoopTicker() as ticker:
                path = await aiostage.persist(state, tmp_path / "many.pt")
        finally:
            sys.setswitchinterval(before)
    assert ticker.ticks > 10
    assert ticker.max_gap < 0.05, ticker.max_gap
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["layer9999.w"], state["layer9999.w"])
