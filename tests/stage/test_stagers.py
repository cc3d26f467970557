"""DefaultStager and BlockingAsyncStager: awaitable staging on CPU."""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import aiostage
from aiostage import (
    AsyncStager,
    BlockingAsyncStager,
    CacheInfo,
    DefaultStager,
    StagerClosedError,
    StagingError,
    StagingOptions,
    StateDictStager,
)
from aiostage._stage import _engine, _plan

MiB = 1024 * 1024


def make_state(n: int = 8, numel: int = 1 << 16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n)
    params = {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)}
    return {
        "model": params,
        "optimizer": {"state": {i: {"exp_avg": torch.randn(numel, generator=g)} for i in range(n)}},
        "step": 7,
    }


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    else:
        assert a == b


@pytest.fixture
def first_batch_hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[anyio.Event]]:
    """Sets the listed events once the first copy batch of a stage has landed."""
    events: list[anyio.Event] = []
    original = _plan.StagePlan.batch_done

    def batch_done(self: _plan.StagePlan, batch: _plan.CopyBatch) -> None:
        original(self, batch)
        for event in events:
            event.set()

    monkeypatch.setattr(_plan.StagePlan, "batch_done", batch_done)
    yield events


def test_stagers_follow_the_protocol() -> None:
    assert isinstance(DefaultStager(), AsyncStager)
    assert isinstance(BlockingAsyncStager(), AsyncStager)


def test_default_options_work_without_an_accelerator() -> None:
    opts = StagingOptions()
    assert opts.pinned == torch.accelerator.is_available()
    assert opts.non_blocking == torch.accelerator.is_available()
    assert opts.use_async_staging and not opts.use_shared_memory
    with pytest.raises(ValueError, match="chunk_bytes"):
        StagingOptions(chunk_bytes=0)


async def test_stage_returns_an_independent_copy() -> None:
    sd = make_state()
    async with DefaultStager(StagingOptions(chunk_bytes=100_000)) as stager:
        staged = await stager.stage(sd)
        assert_same(sd, staged)
        before = staged["model"]["layer0.weight"].clone()
        sd["model"]["layer0.weight"].add_(1)  # mutation after stage returns is fine
        assert torch.equal(staged["model"]["layer0.weight"], before)


async def test_restage_reuses_buffers() -> None:
    sd = make_state()
    async with DefaultStager() as stager:
        first = await stager.stage(sd)
        ptr = first["model"]["layer3.weight"].data_ptr()
        info = stager.cache_info()
        sd["model"]["layer3.weight"].mul_(3)
        second = await stager.stage(sd)
        assert second["model"]["layer3.weight"].data_ptr() == ptr
        assert stager.cache_info() == info
        assert_same(sd, second)


async def test_stage_shares_storages_like_the_engine() -> None:
    a = torch.randn(4, 4)
    b = torch.randn(4, 4)
    async with DefaultStager() as stager:
        out = await stager.stage({"a": a, "v": a.view(16), "b": b, "n": b.narrow(0, 1, 2)})
        assert out["a"].untyped_storage().data_ptr() == out["v"].untyped_storage().data_ptr()
        assert stager.cache_info() == CacheInfo(2, 128)


async def test_inline_staging_option_copies_on_the_calling_thread() -> None:
    sd = make_state(2)
    async with DefaultStager(StagingOptions(use_async_staging=False)) as stager:
        assert_same(sd, await stager.stage(sd))


async def test_concurrent_stages_take_turns_and_never_mix() -> None:
    s1 = make_state(4)
    s2 = make_state(5)
    async with DefaultStager(StagingOptions(chunk_bytes=64 * 1024)) as stager:
        r1, r2 = await asyncio.gather(stager.stage(s1), stager.stage(s2))
        # Different sources -> different buffers; each result equals its own input.
        assert_same(s1, r1)
        assert_same(s2, r2)


async def test_close_waits_for_in_flight_stage_then_refuses() -> None:
    sd = make_state(4, 1 << 18)
    stager = DefaultStager(StagingOptions(chunk_bytes=256 * 1024))
    task = asyncio.create_task(stager.stage(sd))
    await asyncio.sleep(0)  # let the stage take its turn
    await stager.close()
    assert task.done()
    assert_same(sd, task.result())
    assert stager.cache_info() == CacheInfo(0, 0)
    with pytest.raises(StagerClosedError):
        await stager.stage(sd)
    await stager.close()  # idempotent


async def test_context_manager_closes_on_error() -> None:
    stager = DefaultStager()
    with pytest.raises(RuntimeError, match="boom"):
        async with stager:
            await stager.stage({"a": torch.ones(3)})
            raise RuntimeError("boom")
    with pytest.raises(StagerClosedError):
        await stager.stage({"a": torch.ones(3)})


async def test_error_names_path_and_leaves_cache_clean() -> None:
    async with DefaultStager() as stager:
        good = {"w": torch.randn(100)}
        await stager.stage(good)
        info = stager.cache_info()
        bad = {
            "w": good["w"],
            "new": torch.randn(50),
            "optimizer": {"state": {3: {"exp_avg": torch.randn(2, 2).to_sparse()}}},
        }
        with pytest.raises(StagingError) as err:
            await stager.stage(bad)
        assert err.value.path == "optimizer.state.3.exp_avg"
        assert stager.cache_info() == info
        assert_same(good, await stager.stage(good))


async def test_cancelled_stage_stops_writing_and_next_stage_works(
    first_batch_hook: list[anyio.Event],
) -> None:
    sd = make_state(16, 1 << 18)  # 32 MiB in 1 MiB storages, 256 KiB chunks
    opts = StagingOptions(chunk_bytes=256 * 1024, copy_threads=2)
    async with DefaultStager(opts) as stager:
        first = await stager.stage(sd)
        info = stager.cache_info()
        for t in sd["model"].values():
            t.add_(1)
        landed = anyio.Event()
        first_batch_hook.append(landed)
        task = asyncio.create_task(stager.stage(sd))
        await landed.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # No thread may write into the buffers once the stage has returned.
        snapshot = {k: v.clone() for k, v in first["model"].items()}
        await anyio.to_thread.run_sync(lambda: None)
        for _ in range(10):
            await asyncio.sleep(0)
        for key, value in first["model"].items():
            assert torch.equal(value, snapshot[key]), key
        assert stager.cache_info() == info
        assert_same(sd, await stager.stage(sd))


async def test_cancelled_first_stage_caches_nothing(first_batch_hook: list[anyio.Event]) -> None:
    sd = make_state(8, 1 << 18)
    async with DefaultStager(StagingOptions(chunk_bytes=256 * 1024)) as stager:
        landed = anyio.Event()
        first_batch_hook.append(landed)
        with anyio.CancelScope() as scope:
            task = asyncio.create_task(stager.stage(sd))
            await landed.wait()
            scope.cancel()
            await task
        assert task.cancelled()
        assert stager.cache_info() == CacheInfo(0, 0)


async def test_timeout_cancels_cleanly() -> None:
    sd = make_state(4, 1 << 16)
    async with DefaultStager() as stager:
        with anyio.move_on_after(0):
            await stager.stage(sd)
        assert_same(sd, await stager.stage(sd))


# -- BlockingAsyncStager -------------------------------------------------------------


async def test_blocking_stager_copies_and_by_default_allocates_fresh() -> None:
    sd = make_state(2)
    async with BlockingAsyncStager() as stager:
        a = await stager.stage(sd)
        b = await stager.stage(sd)
        assert_same(sd, a)
        assert a["model"]["layer0.weight"].data_ptr() != b["model"]["layer0.weight"].data_ptr()
        assert stager.cache_info() == CacheInfo(0, 0)


async def test_blocking_stager_cache_reuses_one_staged_copy() -> None:
    sd = make_state(2)
    async with BlockingAsyncStager(cache_staged_state_dict=True) as stager:
        a = await stager.stage(sd)
        sd["model"]["layer1.weight"].add_(5)
        b = await stager.stage(sd)
        assert a["model"]["layer1.weight"].data_ptr() == b["model"]["layer1.weight"].data_ptr()
        assert_same(sd, b)
        assert stager.cache_info().storages == 4


async def test_blocking_stager_type_check() -> None:
    class Opaque:
        pass

    async with BlockingAsyncStager(type_check=True) as stager:
        with pytest.raises(StagingError, match="type_check") as err:
            await stager.stage({"extra": {"sampler": Opaque()}})
        assert err.value.path == "extra.sampler"
    async with BlockingAsyncStager() as stager:
        out = await stager.stage({"extra": {"sampler": Opaque()}})
        assert isinstance(out["extra"]["sampler"], Opaque)


def test_public_names_are_exported() -> None:
    for name in [
        "DefaultStager",
        "BlockingAsyncStager",
        "StateDictStager",
        "StagingOptions",
        "AsyncStager",
        "CacheInfo",
    ]:
        assert name in aiostage.__all__


async def test_default_stager_handles_every_kind_of_tensor() -> None:
    z = torch.randn(8, dtype=torch.complex64)
    base = torch.randn(6, 6)
    sd = {
        "param": torch.nn.Parameter(torch.randn(5)),
        "grad": torch.randn(3, requires_grad=True),
        "t": base.t(),
        "slice": base[2:],
        "conj": z.conj(),
        "z": z,
        "bool": torch.rand(7) > 0.5,
        "bf16": torch.randn(9).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    async with DefaultStager(StagingOptions(chunk_bytes=64)) as stager:
        for _ in range(2):
            out = await stager.stage(sd)
            for key, src in sd.items():
                assert out[key].dtype == src.dtype and out[key].shape == src.shape, key
                assert torch.equal(out[key].detach().resolve_conj(), src.detach().resolve_conj()), (
                    key
                )
            assert type(out["param"]) is torch.nn.Parameter and out["param"].requires_grad
            assert out["conj"].is_conj()
            with torch.no_grad():
                sd["param"].add_(1)
                sd["grad"].add_(1)


async def test_close_frees_the_buffers_off_the_loop_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Freeing a large cache (munmap of every buffer) took 80-150 ms for
    1 GiB: close() does it in a worker thread, never on the loop's."""
    loop_thread = threading.get_ident()
    freed_on: list[int] = []
    stager = DefaultStager()
    await stager.stage({"w": torch.randn(1000)})
    real = stager._engine.close

    def spy() -> None:
        freed_on.append(threading.get_ident())
        real()

    monkeypatch.setattr(stager._engine, "close", spy)
    await stager.close()
    assert freed_on and freed_on[0] != loop_thread
    assert stager.cache_info().storages == 0


async def test_close_frees_what_save_handles_hold_off_the_loop_thread(tmp_path: Path) -> None:
    """A save handle's staged copy points into the buffers: dropped after
    close() it would free them on the loop (0.2 s for 1 GiB); close() lets
    go of it with the buffers, in a worker thread."""
    loop_thread = threading.get_ident()
    died_on: list[int] = []
    stager = DefaultStager()
    handle = await stager.save({"w": torch.randn(100_000)}, tmp_path / "c.pt")
    await handle.wait()
    storage = handle.staged["w"].untyped_storage()
    ref = weakref.ref(storage, lambda _: died_on.append(threading.get_ident()))
    del storage
    await stager.close()
    assert handle.staged is None
    assert ref() is None
    assert died_on and died_on[0] != loop_thread


@pytest.mark.parametrize("explicit", [None, 3])
async def test_copy_threads_one_into_new_buffers_all_cores_after(
    monkeypatch: pytest.MonkeyPatch, explicit: int | None
) -> None:
    """By default a stage into newly allocated buffers copies with one
    thread (page faults from several contend), later stages (replays, whose
    copies start early) with one per core (at most 4) once planned; an
    explicit copy_threads is always used."""
    from aiostage._stage import _stagers
    from aiostage._stage._cpu_copy import EarlyCopies

    used: list[int] = []
    real = _stagers.run_in_threads

    async def spy(requests: Any, batches: Any, threads: int, *rest: Any) -> None:
        used.append(threads)
        await real(requests, batches, threads, *rest)

    class EarlySpy(EarlyCopies):
        async def finish(self) -> None:
            used.append(self._threads)
            await super().finish()

    monkeypatch.setattr(_stagers, "run_in_threads", spy)
    monkeypatch.setattr(_stagers, "EarlyCopies", EarlySpy)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    sd = {"w": torch.randn(1000), "b": torch.randn(10)}
    async with DefaultStager(StagingOptions(copy_threads=explicit)) as stager:
        first = await stager.stage(sd)
        assert torch.equal(first["w"], sd["w"])
        await stager.stage(sd)
    assert used == ([1, 4] if explicit is None else [3, 3])


async def test_a_first_stage_maps_its_buffers_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mapping memory is a system call that can wait in the kernel (single
    calls held the loop for 142-750 ms on the development VM): a first
    stage allocates its staging storages in a worker thread."""
    loop_thread = threading.get_ident()
    threads: list[int] = []
    real = _engine._allocate

    def spying(nbytes: int, **kwargs: Any) -> torch.UntypedStorage:
        if nbytes >= _engine.MMAP_MIN_BYTES:  # (smaller ones come from the heap)
            threads.append(threading.get_ident())
        return real(nbytes, **kwargs)

    monkeypatch.setattr(_engine, "_allocate", spying)
    sd = {"model": {f"w{i}": torch.randn(64 * 1024) for i in range(8)}, "step": 3}
    sd["model"]["bias"] = torch.randn(10)
    async with aiostage.DefaultStager() as stager:
        staged = await stager.stage(sd)
        assert len(threads) == 8 and loop_thread not in threads
        assert all(torch.equal(staged["model"][k], v) for k, v in sd["model"].items())
        # A new tensor in a state the stager replays: the replay finds the
        # change and the fresh plan maps the one new buffer itself (the walk
        # ahead is skipped before a replay: see _allocate_ahead).
        sd["model"]["w8"] = torch.randn(64 * 1024)
        staged = await stager.stage(sd)
        assert len(threads) == 9
        assert torch.equal(staged["model"]["w8"], sd["model"]["w8"])
    async with aiostage.DefaultStager() as stager:  # a fresh stager: all ahead again
        threads.clear()
        staged = await stager.stage(sd)
        assert len(threads) == 9 and loop_thread not in threads


async def test_a_replayed_stage_does_not_walk_the_state_for_allocations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The walk that finds what to allocate ahead costs ~1.6 us per tensor;
    a plan that replays the last one allocates nothing."""
    walks: list[int] = []
    real = StateDictStager.fresh_sizes

    def counting(self: StateDictStager, obj: Any, budget_s: float | None) -> Any:
        walks.append(1)
        return real(self, obj, budget_s)

    monkeypatch.setattr(StateDictStager, "fresh_sizes", counting)
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(100)}
    async with aiostage.DefaultStager() as stager:
        await stager.stage(sd)
        assert len(walks) == 1
        for _ in range(2):
            staged = await stager.stage(sd)
        assert len(walks) == 1
        assert all(torch.equal(staged[k], v) for k, v in sd.items())
