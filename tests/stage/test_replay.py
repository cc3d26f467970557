"""The engine's replay of a flat dict staged again: it must never go stale.

After a successful stage of a dict of plain tensors and atomic values, the
next stage of a dict with the same keys checks each tensor against a record
and rebuilds the plan without a traversal.  Each test changes something
between calls and checks the result is still an exact copy of the source.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

import aiostage
from aiostage import StateDictStager


def assert_copy(out: dict[str, Any], sd: dict[str, Any]) -> None:
    assert list(out) == list(sd)
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            got = out[key]
            assert type(got) is type(value)
            assert got.dtype == value.dtype and got.shape == value.shape
            assert got.stride() == value.stride()
            assert got.requires_grad == value.requires_grad
            assert torch.equal(got, value), key
            assert got.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
        else:
            assert out[key] == value


def assert_cached(stager: StateDictStager, out: dict[str, Any], sd: dict[str, Any]) -> None:
    """Each source storage's cache entry is the staging storage its result uses."""
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            dst = stager._cache.get(value.untyped_storage())
            assert dst is not None, key
            assert dst.data_ptr() == out[key].untyped_storage().data_ptr(), key


def state() -> dict[str, Any]:
    base = torch.arange(12, dtype=torch.float32)
    return {
        "a": torch.randn(5),
        "view": base[2:8],
        "same_storage": base.view(3, 4),
        "p": torch.nn.Parameter(torch.randn(3)),
        "step": 7,
        "name": "x",
    }


def stage_twice(stager: StateDictStager, sd: dict[str, Any]) -> dict[str, Any]:
    stager.stage(sd)
    replay = stager._replay
    assert replay is not None
    out = stager.stage(sd)
    assert stager._replay is replay  # the second call replayed the record (and kept it)
    return out


def test_a_replayed_stage_returns_the_same_objects_with_fresh_bytes() -> None:
    stager = StateDictStager()
    sd = state()
    first = stager.stage(sd)
    replay = stager._replay
    assert replay is not None
    sd["a"].add_(1)
    sd["p"].data.mul_(2)
    sd["step"] = 8
    second = stager.stage(sd)
    assert stager._replay is replay
    assert second is not first
    assert all(second[k] is first[k] for k in ("a", "view", "same_storage", "p"))
    assert second["view"].untyped_storage() is second["same_storage"].untyped_storage()
    assert_copy(second, sd)


@pytest.mark.parametrize(
    "change",
    [
        "replace_tensor",
        "add_key",
        "remove_key",
        "reorder_keys",
        "set_storage",
        "data_assign",
        "resize_tensor",
        "shrink_tensor",
        "resize_storage",
        "requires_grad",
        "attribute",
        "atomic_to_tensor",
        "tensor_to_object",
        "share_storage",
        "restride",
        "offset",
        "dtype",
        "same_geometry_other_type",
    ],
)
def test_a_change_between_calls_is_staged_exactly(change: str) -> None:
    stager = StateDictStager()
    sd = state()
    stage_twice(stager, sd)
    if change == "replace_tensor":
        sd["a"] = torch.randn(5)
    elif change == "add_key":
        sd["new"] = torch.ones(2)
    elif change == "remove_key":
        del sd["view"]
    elif change == "reorder_keys":
        sd = {k: sd[k] for k in reversed(list(sd))}
    elif change == "set_storage":
        sd["a"].set_(torch.arange(5, dtype=torch.float32).untyped_storage(), 0, (5,), (1,))
    elif change == "data_assign":
        sd["p"].data = torch.arange(4, dtype=torch.float64)
    elif change == "resize_tensor":
        sd["a"].resize_(40)
        sd["a"].copy_(torch.arange(40, dtype=torch.float32))
    elif change == "shrink_tensor":
        sd["a"].resize_(3)  # same storage, stride and offset: only the size tells
    elif change == "resize_storage":
        # Same tensor geometry, bigger storage: the staging storage must follow.
        sd["a"].untyped_storage().resize_(64)
    elif change == "requires_grad":
        sd["p"].requires_grad_(False)
    elif change == "attribute":
        sd["a"].note = "added"
    elif change == "atomic_to_tensor":
        sd["step"] = torch.tensor(8)
    elif change == "tensor_to_object":
        sd["a"] = [torch.ones(3), 1]
    elif change == "share_storage":
        sd["a"] = sd["view"][1:3]
    elif change == "restride":  # only the stride changes
        sd["same_storage"].as_strided_((3, 4), (1, 3))
    elif change == "offset":  # only the offset changes
        sd["view"].set_(sd["view"].untyped_storage(), 3, (6,), (1,))
    elif change == "dtype":  # only the dtype changes
        sd["a"].data = sd["a"].data.view(torch.int32)
    elif change == "same_geometry_other_type":  # another object on the same bytes
        keep = sd["a"]
        sd["a"] = torch.nn.Parameter(keep, requires_grad=False)
    out = stager.stage(sd)
    if change == "attribute":
        assert out["a"].note == "added"
    if change == "tensor_to_object":
        assert isinstance(out["a"], list) and torch.equal(out["a"][0], sd["a"][0])
        del sd["a"], out["a"]
    if change == "share_storage":
        assert out["a"].untyped_storage() is out["view"].untyped_storage()
    assert_copy(out, sd)
    assert_cached(stager, out, sd)
    # And the stage after that (a replay of the new structure, where it has one) too.
    for value in sd.values():
        if isinstance(value, torch.Tensor):
            value.data.add_(1)
    out = stager.stage(sd)
    assert_copy(out, sd)
    assert_cached(stager, out, sd)


@pytest.mark.parametrize(
    "change", ["unsqueeze", "t", "shrink", "set", "requires_grad", "attribute"]
)
def test_a_replayed_result_changed_in_place_is_not_handed_out_again(change: str) -> None:
    stager = StateDictStager()
    sd = {
        "m": torch.arange(6.0).reshape(2, 3),
        "v": torch.arange(6.0),
        "p": torch.nn.Parameter(torch.randn(2, 2)),
    }
    out = stage_twice(stager, sd)
    if change == "unsqueeze":
        out["m"].unsqueeze_(0)
    elif change == "t":
        with torch.no_grad():
            out["p"].t_()
    elif change == "shrink":
        out["v"].resize_(4)  # same storage, stride and offset: only the size tells
    elif change == "set":
        out["m"].set_(torch.zeros(6).untyped_storage(), 0, (2, 3), (3, 1))
    elif change == "requires_grad":
        out["p"].requires_grad_(False)
    elif change == "attribute":
        out["m"].note = "mine"
    again = stager.stage(sd)
    assert not hasattr(again["m"], "note")
    assert_copy(again, sd)


def test_a_dead_source_drops_the_replay_and_its_staging_memory_is_reused() -> None:
    stager = StateDictStager()
    sd = {"a": torch.randn(1000), "b": torch.randn(10)}
    out = stage_twice(stager, sd)
    replay = stager._replay
    assert replay is not None
    old_ptr = out["a"].untyped_storage().data_ptr()
    del out
    sd["a"] = torch.randn(1000)  # the old source dies: the records go at once
    gc.collect()
    assert replay.records is None
    again = stager.stage(sd)
    assert again["a"].untyped_storage().data_ptr() == old_ptr
    assert_copy(again, sd)


def test_close_drops_the_replay() -> None:
    stager = StateDictStager()
    sd = state()
    stage_twice(stager, sd)
    stager.close()
    assert stager._replay is None
    assert_copy(stager.stage(sd), sd)


async def test_the_async_stager_replays_many_tensors_exactly() -> None:
    # Enough tensors for the replay to yield to the loop between slices.
    sd: dict[str, Any] = {f"t{i}": torch.full((4,), float(i)) for i in range(3000)}
    sd["big"] = torch.randn(100_000)
    async with aiostage.DefaultStager() as stager:
        first = await stager.stage(sd)
        for value in sd.values():
            value.add_(1)
        replay = stager._engine._replay
        second = await stager.stage(sd)
        assert replay is not None and stager._engine._replay is replay
        assert second["t5"] is first["t5"]
        assert_copy(second, sd)
        sd["t2999"] = torch.zeros(4)
        sd["t0"].set_(torch.ones(8).untyped_storage(), 2, (4,), (1,))
        third = await stager.stage(sd)
        assert_copy(third, sd)


@pytest.mark.parametrize("steps", [1, 3, 10, 40])
def test_a_dict_changed_while_a_sliced_plan_yields_is_staged_exactly_next_time(
    steps: int,
) -> None:
    # budget_s=0 yields at every chance; the dict changes at one of them, as
    # a caller's task could while the async stagers give the loop a turn.
    stager = StateDictStager()
    sd: dict[str, Any] = {f"t{i}": torch.full((3,), float(i)) for i in range(300)}
    for _ in range(2):  # the 1st plan records, the 2nd one replays
        gen = stager.plan(sd, budget_s=0.0)
        plan = None
        try:
            for _ in range(steps):
                next(gen)
            sd["t7"] = torch.zeros(5)
            sd["t250"].set_(torch.ones(3).untyped_storage(), 0, (3,), (1,))
            while True:
                next(gen)
        except StopIteration as stop:
            plan = stop.value
        assert plan is not None
        stager._copy_all(plan, False)
        stager.commit(plan)
        out = stager.stage(sd)
        assert_copy(out, sd)
        assert_cached(stager, out, sd)


def test_a_new_state_dict_of_the_same_parameters_replays() -> None:
    """model.state_dict() returns new tensor objects every call; what the
    replay checks is their storages and geometry, so it still applies."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    stager = StateDictStager()
    stager.stage(model.state_dict())
    replay = stager._replay
    assert replay is not None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    sd = model.state_dict()
    out = stager.stage(sd)
    assert stager._replay is replay  # replayed, not planned again
    assert_copy(out, sd)
    assert_cached(stager, out, sd)
    assert type(out) is type(sd)  # an OrderedDict, with the module metadata copied
    assert out._metadata == sd._metadata and out._metadata is not sd._metadata


@pytest.mark.parametrize("attribute", ["tensor", "odd_metadata"])
def test_a_dict_with_other_attributes_is_not_replayed(attribute: str) -> None:
    """Only a state_dict's plain ``_metadata`` is copied by the replay; any
    other attribute goes through the full plan (which stages its tensors)."""
    model = torch.nn.Linear(3, 2)
    stager = StateDictStager()
    sd = model.state_dict()
    stage_twice(stager, sd)
    if attribute == "tensor":
        sd.extra = torch.ones(2)  # type: ignore[attr-defined]
    else:
        sd._metadata[""]["t"] = torch.ones(1)  # type: ignore[attr-defined]
    out = stager.stage(sd)
    assert_copy(out, sd)
    if attribute == "tensor":
        assert torch.equal(out.extra, sd.extra)  # type: ignore[attr-defined]
        assert out.extra.untyped_storage() is not sd.extra.untyped_storage()  # type: ignore[attr-defined]
    else:
        staged = out._metadata[""]["t"]  # type: ignore[attr-defined]
        assert torch.equal(staged, torch.ones(1))
        assert staged is not sd._metadata[""]["t"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("bit", ["conj", "neg"])
def test_a_new_view_with_a_conjugate_or_negative_bit_is_not_replayed(bit: str) -> None:
    """Same storage, dtype and geometry, but a view flag that changes the
    values: the record must not be replayed."""
    x = torch.randn(6, dtype=torch.complex64)
    stager = StateDictStager()
    stage_twice(stager, {"x": x})
    view = x.conj() if bit == "conj" else torch._neg_view(x)
    out = stager.stage({"x": view})
    assert torch.equal(out["x"], view)
    back = stager.stage({"x": x})  # and back to the plain tensor
    assert torch.equal(back["x"], x) and not back["x"].is_conj() and not back["x"].is_neg()
