"""aiostage._gc: the cyclic collector is paused for the length of a stage, a load
and a write's pickling."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aiostage import DefaultStager, PersistError, _gc, load, persist
from aiostage._gc import gc_paused
from aiostage._persist import _archive, _writer


@pytest.fixture(autouse=True)
def nothing_frozen_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests elsewhere freeze the heap for a while, which turns the move to
    the oldest generation off for the rest of the process."""
    monkeypatch.setattr(_gc, "_process_froze", False)


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.mark.usefixtures("collector_on")
def test_pause_nests_and_restores() -> None:
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()


def _ids(generation: int) -> set[int]:
    return {id(o) for o in gc.get_objects(generation)}


@pytest.mark.usefixtures("collector_on")
def test_a_collector_disabled_by_the_caller_stays_disabled() -> None:
    gc.disable()
    with gc_paused():
        made = [[] for _ in range(100)]
    assert not gc.isenabled()
    assert id(made[0]) in _ids(0)  # and nothing was moved: the caller runs the collector


@pytest.mark.usefixtures("collector_on")
def test_what_outlives_a_pause_skips_the_young_generations() -> None:
    """The first young collection after a load of 20,000 tensors scanned
    every one (7-10 ms on the loop; 19-41 ms after a first stage of as
    many): what outlives the pause goes to the oldest generation unscanned."""
    with gc_paused():
        with gc_paused():
            made = [[] for _ in range(1000)]
        assert id(made[0]) in _ids(0)  # (an inner pause's end moves nothing)
    ids = {id(x) for x in made}
    assert not ids & (_ids(0) | _ids(1))
    assert ids <= _ids(2)


@pytest.mark.usefixtures("collector_on")
def test_objects_the_process_froze_stay_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unfreeze would thaw what the process froze itself (a pre-fork
    server's objects, say): then nothing is moved, and, since counting
    frozen objects walks them all, they are not counted again."""
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with gc_paused():
            made = [[] for _ in range(100)]
        assert gc.get_freeze_count() == frozen
        assert id(made[0]) in _ids(0)
    finally:
        gc.unfreeze()
    counted: list[int] = []
    monkeypatch.setattr(_gc.gc, "get_freeze_count", lambda: counted.append(1) or 0)
    with gc_paused():
        later = [[] for _ in range(100)]
    assert counted == []
    assert id(later[0]) in _ids(0)


@pytest.mark.usefixtures("collector_on")
async def test_a_loads_tensors_are_not_left_to_a_young_collection(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(2000)}
    await persist(state, tmp_path / "a.pt")
    loaded = await load(tmp_path / "a.pt")
    young = _ids(0) | _ids(1)
    assert id(loaded) not in young
    assert not {id(t) for t in loaded.values()} & young
    assert torch.equal(loaded["t1999"], state["t1999"])


@pytest.mark.usefixtures("collector_on")
async def test_no_collection_runs_while_a_stage_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages of many tensors used to trigger a full collection every other
    stage (25-40 ms held on the loop); during a stage none runs now, and
    the collector is back on after each stage, a failed and a cancelled
    one included."""
    sd: dict[str, Any] = {f"t{i}": torch.full((8,), float(i)) for i in range(5_000)}
    inside = [False]
    during: list[int] = []

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and inside[0]:
            during.append(info["generation"])

    real = DefaultStager._stage_paused

    async def marked(self: DefaultStager, *args: Any) -> Any:
        inside[0] = True
        try:
            return await real(self, *args)
        finally:
            inside[0] = False

    monkeypatch.setattr(DefaultStager, "_stage_paused", marked)
    gc.callbacks.append(watch)
    try:
        async with DefaultStager() as stager:
            for _ in range(5):
                staged = await stager.stage(sd)
                assert gc.isenabled()
                assert torch.equal(staged["t4999"], sd["t4999"])
                garbage = [[] for _ in range(5_000)]  # what the caller does in between
                for g in garbage:
                    g.append(g)  # cycles, for the collector to find later
                del garbage
            task = asyncio.create_task(stager.stage(sd))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert gc.isenabled()
            with pytest.raises(Exception):  # noqa: B017 - any staging error
                await stager.stage({"bad": object.__new__(_Unstageable)})
            assert gc.isenabled()
    finally:
        gc.callbacks.remove(watch)
    assert during == []


class _Unstageable:
    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("cannot be staged")


@pytest.mark.usefixtures("collector_on")
async def test_a_write_pickles_and_lays_out_its_batches_with_the_collector_paused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Pickling 10,000 tensors in the writer's thread set off an 85 ms full
    collection, with the loop waiting for the GIL; the collector is off for
    the pickling and the batching now, and on again afterwards, after a
    failed write too."""
    enabled: list[tuple[str, bool]] = []
    real_pickle, real_batches = _archive.pickle_state, _writer._batches

    def pickle_state(obj: object) -> Any:
        enabled.append(("pickle", gc.isenabled()))
        return real_pickle(obj)

    def batches(*args: Any) -> Any:
        enabled.append(("batches", gc.isenabled()))
        return real_batches(*args)

    monkeypatch.setattr(_archive, "pickle_state", pickle_state)
    monkeypatch.setattr(_writer, "_batches", batches)
    await persist({"w": torch.ones(4)}, tmp_path / "a.pt")
    assert enabled == [("pickle", False), ("batches", False)]
    assert gc.isenabled()
    with pytest.raises(PersistError):
        await persist({"bad": object.__new__(_Unstageable)}, tmp_path / "b.pt")
    assert gc.isenabled()


@pytest.mark.usefixtures("collector_on")
async def test_writing_the_central_directory_sets_off_no_collection(tmp_path: Path) -> None:
    """A tuple per record (20,000 of them) set off young collections of the
    writer's own records, then a full one (142 ms, the loop waiting for the
    GIL); the directory is built with no container per record now."""
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(5000)}
    plan = _archive.plan_archive(*_archive.pickle_state(state))
    collections: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    try:
        tail = plan.tail_bytes()
    finally:
        gc.callbacks.remove(count)
    assert collections == []
    assert tail.count(b"PK\x01\x02") == len(plan.head_records) + 5000 + len(plan.tail_records)
