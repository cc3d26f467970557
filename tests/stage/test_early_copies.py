"""Copies that start while a replayed plan is still being checked (EarlyCopies).

A ``DefaultStager`` staging the same CPU state again checks the replayed
plan block by block on the loop; the blocks that pass are copied by a
worker thread meanwhile.  These tests pin down that the copies really start
early, that the result is exact whether the replay completes or gives up
half-way, that a failure or a cancellation leaves no copy running, and that
``save()``'s writer sees each storage land.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import aiostage
from aiostage import DefaultStager, StagingError, StagingOptions
from aiostage._stage import _cpu_copy, _stagers
from aiostage._stage._engine import StateDictStager
from aiostage._stage._plan import StagePlan

#: Small enough that every checked block of the states below fills a batch.
CHUNK = 1 << 16


def small_state(n: int = 600, numel: int = 256) -> dict[str, torch.Tensor]:
    return {f"layer{i}.bias": torch.full((numel,), float(i)) for i in range(n)}


def assert_exact(out: dict[str, Any], sd: dict[str, Any]) -> None:
    assert list(out) == list(sd)
    for key, value in sd.items():
        assert out[key].shape == value.shape, key
        assert torch.equal(out[key], value), key
        assert out[key].untyped_storage().data_ptr() != value.untyped_storage().data_ptr()


class CopySpy:
    """Wraps ``_copy_prepared``: counts the copies running and, optionally,
    holds each one until :attr:`gate` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: bool = False) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.lock = threading.Lock()
        self.active = 0
        self.calls = 0
        self.during_plan = 0  # copies begun while the plan generator was unfinished
        self.planning = False
        real = _cpu_copy._copy_prepared

        def spy(*args: Any) -> None:
            with self.lock:
                self.active += 1
                self.calls += 1
                self.during_plan += self.planning
            self.started.set()
            try:
                assert self.gate.wait(30), "the test never released the copy"
                real(*args)
            finally:
                with self.lock:
                    self.active -= 1

        monkeypatch.setattr(_cpu_copy, "_copy_prepared", spy)
        real_plan = _stagers.DefaultStager._plan

        async def plan(stager: Any, *args: Any) -> Any:
            self.planning = True
            try:
                return await real_plan(stager, *args)
            finally:
                self.planning = False

        monkeypatch.setattr(_stagers.DefaultStager, "_plan", plan)
        self._monkeypatch = monkeypatch
        self.waited: list[bool] = []

    def wait_at_first_turn(self) -> None:
        """At the first turn the loop gets during a plan after a block of
        tensors passed its checks, wait for a copy to begin: it can only be
        one of the blocks checked so far."""
        real_turn = _stagers._let_timers_run
        real_checked = _cpu_copy.EarlyCopies.checked
        checked = threading.Event()

        def on_checked(early: Any, *args: Any) -> None:
            real_checked(early, *args)
            checked.set()

        async def turn() -> None:
            if not self.waited and checked.is_set():
                self.waited.append(await anyio.to_thread.run_sync(self.started.wait, 10))
            await real_turn()

        self._monkeypatch.setattr(_cpu_copy.EarlyCopies, "checked", on_checked)
        self._monkeypatch.setattr(_stagers, "_let_timers_run", turn)


@contextlib.asynccontextmanager
async def replaying(
    monkeypatch: pytest.MonkeyPatch, sd: dict[str, torch.Tensor]
) -> AsyncIterator[DefaultStager]:
    """A stager that has staged ``sd`` once (so the next stage replays),
    whose plans give the loop a turn after every block of checks."""
    monkeypatch.setattr(_stagers, "TRAVERSAL_BUDGET_S", 0.0)
    async with DefaultStager(StagingOptions(chunk_bytes=CHUNK)) as stager:
        await stager.stage(sd)
        yield stager


def run_plan(gen: Generator[None, None, StagePlan]) -> StagePlan:
    """Drive an engine's plan() generator to its end."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


async def test_replayed_copies_start_before_the_plan_is_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sd = small_state()
    async with replaying(monkeypatch, sd) as stager:
        spy = CopySpy(monkeypatch)
        spy.wait_at_first_turn()
        for value in sd.values():
            value.add_(1)
        out = await stager.stage(sd)
    assert spy.waited == [True], "no copy started while the plan was being checked"
    assert spy.during_plan >= 1
    assert_exact(out, sd)


async def test_a_replay_that_gives_up_after_early_copies_stages_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sd = small_state()
    async with replaying(monkeypatch, sd) as stager:
        cached = stager._engine._cache.get
        ptrs = {k: cached(v.untyped_storage()).data_ptr() for k, v in sd.items()}  # type: ignore[union-attr]
        spy = CopySpy(monkeypatch)
        spy.wait_at_first_turn()
        for value in sd.values():
            value.mul_(-3)
        # The last block is checked last (it holds the fewest bytes): the
        # replay gives up there, after the blocks before it were copied.
        sd["layer599.bias"].resize_(300).fill_(7.0)
        out = await stager.stage(sd)
        assert spy.during_plan >= 1
        assert_exact(out, sd)
        unchanged = [k for k in sd if k != "layer599.bias"]
        assert all(out[k].untyped_storage().data_ptr() == ptrs[k] for k in unchanged)
        # ... and the fresh plan is replayed again next time.
        for value in sd.values():
            value.add_(0.5)
        assert_exact(await stager.stage(sd), sd)


async def test_the_largest_block_is_checked_and_reported_first() -> None:
    engine = StateDictStager()
    sd: dict[str, torch.Tensor] = {f"s{i}": torch.zeros(4) for i in range(300)}
    sd["big"] = torch.zeros(1 << 16)
    first = run_plan(engine.plan(sd))
    first.by_device()  # (what DefaultStager asks, and the replay keeps)
    engine._copy_all(first, False)
    engine.commit(first)
    ranges: list[tuple[int, int]] = []
    engine.commit(run_plan(engine.plan(sd, on_checked=lambda _r, _w, a, b: ranges.append((a, b)))))
    assert ranges[0] == (256, 301)  # the block holding "big" (request 300)
    assert sorted(ranges) == [(0, 128), (128, 256), (256, 301)]


async def test_no_early_copies_for_shared_storages() -> None:
    engine = StateDictStager()
    base = torch.arange(20.0)
    sd = {"a": base[:10], "b": base[10:], "c": torch.ones(3)}
    engine.stage(sd)
    calls: list[Any] = []
    plan = run_plan(engine.plan(sd, on_checked=lambda *args: calls.append(args)))
    assert plan.replay is not None  # a replay, but not one that streams
    assert calls == []


async def test_cancelled_during_the_plan_waits_for_the_copy_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sd = small_state()
    async with replaying(monkeypatch, sd) as stager:
        spy = CopySpy(monkeypatch, hold=True)
        paused = asyncio.Event()
        real_turn = _stagers._let_timers_run

        async def turn() -> None:
            # The plan stops at its first turn, once a copy has begun (and is
            # held), until the test cancels it.
            if not paused.is_set():
                assert await anyio.to_thread.run_sync(spy.started.wait, 10)
                paused.set()
                await asyncio.Event().wait()
            await real_turn()

        monkeypatch.setattr(_stagers, "_let_timers_run", turn)
        task = asyncio.ensure_future(stager.stage(sd))
        await paused.wait()
        assert spy.planning
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done, "the stage returned while its copy was still running"
        spy.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert spy.active == 0
        # The stager works on, and exactly: the cancelled plan took the
        # replay with it, the next stage records it again, and the one after
        # copies early again.
        calls = spy.calls
        for _ in range(2):
            for value in sd.values():
                value.sub_(2)
            assert_exact(await stager.stage(sd), sd)
        assert spy.calls > calls


async def test_a_failed_early_copy_raises_a_staging_error_and_the_next_stage_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sd = small_state()
    async with replaying(monkeypatch, sd) as stager:
        real = torch._foreach_copy_

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("simulated copy failure")

        monkeypatch.setattr(torch, "_foreach_copy_", broken)
        monkeypatch.setattr(torch.Tensor, "copy_", broken)
        with pytest.raises(StagingError, match="simulated copy failure") as info:
            await stager.stage(sd)
        assert info.value.path is not None and info.value.path.startswith("layer")
        monkeypatch.setattr(torch, "_foreach_copy_", real)
        monkeypatch.undo()
        for value in sd.values():
            value.add_(4)
        assert_exact(await stager.stage(sd), sd)


@pytest.mark.parametrize("numel", [256, 40_000])  # 1 KiB tensors; 160 KiB ones cut in chunks
async def test_save_of_a_replayed_state_writes_what_landed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, numel: int
) -> None:
    sd = small_state(300, numel)
    async with replaying(monkeypatch, sd) as stager:
        await (await stager.save(sd, tmp_path / "a.pt")).wait()
        spy = CopySpy(monkeypatch)
        spy.wait_at_first_turn()
        for value in sd.values():
            value.add_(10)
        await (await stager.save(sd, tmp_path / "b.pt")).wait()
    assert spy.during_plan >= 1
    loaded = await aiostage.load(tmp_path / "b.pt")
    assert_exact(loaded, sd)


async def test_a_replayed_nested_state_copies_early_saves_exactly_and_names_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The usual checkpoint, {"model": ..., "optim": ..., "step": ...} built
    anew each time, replays with early copies like a flat dict."""
    model = small_state(300)
    moments = {i: {"exp_avg": torch.full((64,), -float(i))} for i in range(300)}

    def checkpoint(step: int) -> dict[str, Any]:
        return {"model": dict(model), "optim": {"state": moments}, "step": step}

    monkeypatch.setattr(_stagers, "TRAVERSAL_BUDGET_S", 0.0)
    async with DefaultStager(StagingOptions(chunk_bytes=CHUNK)) as stager:
        await (await stager.save(checkpoint(1), tmp_path / "a.pt")).wait()
        replay = stager._engine._replay
        spy = CopySpy(monkeypatch)
        spy.wait_at_first_turn()
        for value in model.values():
            value.add_(10)
        await (await stager.save(checkpoint(2), tmp_path / "b.pt")).wait()
        assert replay is not None and stager._engine._replay is replay
        assert spy.waited == [True], "no copy started while the plan was being checked"
        assert spy.during_plan >= 1
        loaded = await aiostage.load(tmp_path / "b.pt")
        assert loaded["step"] == 2
        assert_exact(loaded["model"], model)
        for i, moment in moments.items():
            assert torch.equal(loaded["optim"]["state"][i]["exp_avg"], moment["exp_avg"]), i

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("simulated copy failure")

        monkeypatch.setattr(torch, "_foreach_copy_", broken)
        monkeypatch.setattr(torch.Tensor, "copy_", broken)
        with pytest.raises(StagingError, match="simulated copy failure") as info:
            await stager.stage(checkpoint(3))
        assert info.value.path is not None
        assert info.value.path.startswith(("model.layer", "optim.state."))


async def test_a_request_cut_in_chunks_lands_with_its_last_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storage larger than a chunk is copied in several batches; a writer
    waiting for it must not be woken before the last one has landed."""
    from aiostage._stage._plan import CopyRequest, StagePlan
    from aiostage._stage._traverse import ROOT

    src = torch.arange(40_000.0)
    dst = torch.empty(40_000)
    nbytes = src.untyped_storage().nbytes()
    requests = [CopyRequest(src.untyped_storage(), dst.untyped_storage(), nbytes, (ROOT, "w"))]
    whole = {0: (src, dst)}
    early = _cpu_copy.EarlyCopies(1, CHUNK)
    seen: list[bool] = []
    real = _cpu_copy.EarlyCopies._on_landed

    def on_landed(self: Any, batch: Any) -> None:
        real(self, batch)
        if self._plan is not None:
            seen.append(self._plan.is_landed(0))

    monkeypatch.setattr(_cpu_copy.EarlyCopies, "_on_landed", on_landed)
    early.checked(requests, whole, 0, 1)
    plan = StagePlan({"w": dst}, requests, [], whole)
    early.attach(plan)
    await early.finish()
    assert torch.equal(src, dst)
    chunks = -(-nbytes // CHUNK)
    assert seen[-1] is True and not any(seen[:-1]) and len(seen) <= chunks
    assert plan.is_landed(0)


async def test_a_batched_copy_that_fails_as_a_whole_is_a_staging_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If only the many-at-once copy fails (each tensor copies fine on its
    own), the error the caller gets is still a StagingError."""
    sd = small_state()
    async with replaying(monkeypatch, sd) as stager:

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("simulated batched copy failure")

        monkeypatch.setattr(torch, "_foreach_copy_", broken)
        with pytest.raises(StagingError, match="simulated batched copy failure"):
            await stager.stage(sd)
