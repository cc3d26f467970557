"""The engine's replay of a state staged again: it must never go stale.

After a successful stage of a state of dicts, lists and tuples over plain
tensors and atomic values, the next stage of a state of the same shape checks
each tensor against a record and rebuilds the plan without a traversal.  Each
test changes something between calls and checks the result is still an exact
copy of the source, for a flat dict and for the same dict nested deeper.
"""

from __future__ import annotations

import gc
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _compare import assert_same

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


#: Where the dict under test sits in the state staged: a new state is built
#: around it for every call, as a trainer builds {"model": ..., "step": ...}.
#: Each entry: (build the state around the dict, find the dict in a copy).
WRAPS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "flat": (lambda sd: sd, lambda out: out),
    "nested": (lambda sd: {"model": sd, "step": 1}, lambda out: out["model"]),
    "deep": (
        lambda sd: {"a": [0, {"b": (sd, "x"), "c": []}], "betas": (0.9, 0.99)},
        lambda out: out["a"][1]["b"][0],
    ),
}


def stage_twice(stager: StateDictStager, sd: dict[str, Any], wrap: str = "flat") -> dict[str, Any]:
    around, within = WRAPS[wrap]
    stager.stage(around(sd))
    replay = stager._replay
    assert replay is not None
    out = stager.stage(around(sd))
    assert stager._replay is replay  # the second call replayed the record (and kept it)
    return within(out)  # type: ignore[no-any-return]


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
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_a_change_between_calls_is_staged_exactly(change: str, wrap: str) -> None:
    around, within = WRAPS[wrap]
    stager = StateDictStager()
    sd = state()
    stage_twice(stager, sd, wrap)
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
    out = within(stager.stage(around(sd)))
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
    out = within(stager.stage(around(sd)))
    assert_copy(out, sd)
    assert_cached(stager, out, sd)


@pytest.mark.parametrize(
    "change", ["unsqueeze", "t", "shrink", "set", "requires_grad", "attribute"]
)
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_a_replayed_result_changed_in_place_is_not_handed_out_again(change: str, wrap: str) -> None:
    around, within = WRAPS[wrap]
    stager = StateDictStager()
    sd = {
        "m": torch.arange(6.0).reshape(2, 3),
        "v": torch.arange(6.0),
        "p": torch.nn.Parameter(torch.randn(2, 2)),
    }
    out = stage_twice(stager, sd, wrap)
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
    again = within(stager.stage(around(sd)))
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


# -- nested states --------------------------------------------------------------


def assert_like_traversal(got: Any, want: Any) -> None:
    """``got`` is the copy ``want`` is (``want``: a fresh stager's traversal
    of the same state): the same containers, keys, tensors and bits, the same
    module metadata, and the same objects shared in the same places (also
    where a container holds itself)."""
    firsts: tuple[dict[int, str], dict[int, str]] = ({}, {})

    def first(side: int, key: int, where: str) -> str:
        return firsts[side].setdefault(key, where)

    def walk(a: Any, b: Any, where: str) -> None:
        assert type(a) is type(b), where
        if isinstance(b, torch.Tensor):
            assert first(0, id(a), where) == first(1, id(b), where), where
            storages = (a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr())
            assert first(0, storages[0], where) == first(1, storages[1], where), where
            assert_same(a, b, where)
            assert (a.is_conj(), a.is_neg()) == (b.is_conj(), b.is_neg()), where
            return
        if not isinstance(b, dict | list | tuple):
            assert a == b, where
            return
        containers = torch.Tensor | dict | list | tuple
        if type(b) is tuple and not any(isinstance(v, containers) for v in b):
            assert a == b, where  # (atomic values: the traversal hands out the tuple itself)
            return
        seen = (first(0, id(a), where), first(1, id(b), where))
        assert seen[0] == seen[1], where
        if seen[1] != where:
            return  # reached before: compared there
        assert len(a) == len(b), where
        if isinstance(b, dict):
            assert list(a) == list(b), where
            assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
            for key in b:
                walk(a[key], b[key], f"{where}.{key}")
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}.{i}")

    walk(got, want, "<root>")


def test_a_model_and_optimizer_checkpoint_replays_step_after_step() -> None:
    """{"model": ..., "optim": ..., "step": ...} built anew every step, the
    usual checkpoint: after the optimizer's first step it replays."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(
        [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": 1e-2},
        ]
    )
    stager = StateDictStager()
    replays = []
    for step in range(5):
        model(torch.randn(3, 4)).sum().backward()
        optim.step()
        optim.zero_grad()
        state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": step}
        before = stager._replay
        out = stager.stage(state)
        replays.append(before is not None and stager._replay is before)
        assert_like_traversal(out, StateDictStager().stage(state))
        betas = state["optim"]["param_groups"][0]["betas"]
        assert out["optim"]["param_groups"][0]["betas"] is betas
    assert replays == [False, True, True, True, True]


def test_a_container_shared_since_the_record_is_shared_in_the_copy() -> None:
    stager = StateDictStager()
    t = torch.ones(2)
    sd = {"a": {"w": t}, "b": {"w": t}}  # two dicts over the same tensor
    stage_twice(stager, sd)
    sd["b"] = sd["a"]  # now one dict, twice: every leaf is as recorded
    out = stager.stage(sd)
    assert out["b"] is out["a"]
    assert_like_traversal(out, StateDictStager().stage(sd))


def test_keys_equal_to_the_recorded_ones_are_the_callers_keys() -> None:
    stager = StateDictStager()
    t = torch.ones(2)
    stage_twice(stager, {"state": {1: t, 2: 3}}, "nested")
    out = stager.stage({"model": {"state": {1.0: t, True + 1: 3}}, "step": 1})
    keys = list(out["model"]["state"])
    assert keys == [1, 2] and type(keys[0]) is float


def test_an_attribute_on_a_nested_ordered_dict_is_staged() -> None:
    stager = StateDictStager()
    inner: OrderedDict[str, Any] = OrderedDict(w=torch.ones(2))
    stage_twice(stager, {"inner": inner}, "nested")
    inner.note = torch.zeros(3)  # type: ignore[attr-defined]
    out = stager.stage({"model": {"inner": inner}, "step": 1})["model"]["inner"]
    assert torch.equal(out.note, torch.zeros(3))
    assert out.note.untyped_storage() is not inner.note.untyped_storage()  # type: ignore[attr-defined]


def test_a_recursive_state_after_a_replayed_one_is_staged_exactly() -> None:
    stager = StateDictStager()
    inner: list[Any] = [torch.ones(2), 1]
    sd: dict[str, Any] = {"x": inner}
    stage_twice(stager, sd)
    inner[1] = inner  # a container in itself, where an atomic value was
    out = stager.stage(sd)
    assert out["x"][1] is out["x"]
    assert torch.equal(out["x"][0], inner[0])


class _Fuzz:
    """Random nested states and random changes between stages."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.bases = [torch.randn(self.rng.randint(1, 40)) for _ in range(3)]
        self.betas = (0.9, 0.99)

    def leaf(self) -> Any:
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            return torch.randn(rng.randint(0, 5))
        if r < 0.5:
            base = rng.choice(self.bases)
            start = rng.randint(0, base.numel() - 1)
            return base[start : start + rng.randint(0, 3)]
        if r < 0.55:
            return torch.nn.Parameter(torch.randn(2), requires_grad=rng.random() < 0.5)
        if r < 0.6:
            return torch.tensor(rng.randint(0, 9))
        if r < 0.7:
            return self.betas
        return rng.choice([1, 2.5, "s", None, True, torch.float16])

    def node(self, depth: int) -> Any:
        rng = self.rng
        if depth >= 4 or rng.random() < 0.3:
            return self.leaf()
        kind = rng.choice(["dict", "module", "list", "tuple"])
        items = [self.node(depth + 1) for _ in range(rng.randint(0, 5))]
        if kind == "dict":
            return {(f"k{i}" if rng.random() < 0.8 else i): v for i, v in enumerate(items)}
        if kind == "module":
            out = OrderedDict((f"m{i}", v) for i, v in enumerate(items))
            out._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
            return out
        return items if kind == "list" else tuple(items)

    def state(self) -> dict[str, Any]:
        return {f"r{i}": self.node(1) for i in range(self.rng.randint(1, 5))}

    def slots(self, obj: Any, out: list[tuple[Any, Any]], seen: set[int]) -> None:
        """Every (container, key) a change can write to (dicts and lists)."""
        if not isinstance(obj, dict | list | tuple) or id(obj) in seen:
            return
        seen.add(id(obj))
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if not isinstance(obj, tuple):
                out.append((obj, key))
            self.slots(value, out, seen)

    def change(self, state: dict[str, Any]) -> str:
        rng = self.rng
        how = rng.choice(["none", "none", "leaf", "add", "remove", "retype", "share", "resize"])
        slots: list[tuple[Any, Any]] = []
        self.slots(state, slots, set())
        parent, key = rng.choice(slots)
        value = parent[key]
        if how == "leaf":
            parent[key] = self.leaf()
        elif how == "add":
            if isinstance(value, dict):
                value[f"new{rng.random()}"] = self.leaf()
            elif isinstance(value, list):
                value.append(self.leaf())
        elif how == "remove" and isinstance(value, dict | list) and len(value):
            value.pop(next(iter(value)) if isinstance(value, dict) else -1)
        elif how == "retype" and type(value) in (list, tuple):
            parent[key] = tuple(value) if type(value) is list else list(value)
        elif how == "share":
            containers = [p[k] for p, k in slots if isinstance(p[k], dict | list)]
            if containers:
                parent[key] = rng.choice(containers)
        elif how == "resize" and type(value) is torch.Tensor and value.dim() == 1:
            value.resize_(value.numel() + 1)
            value[-1:] = 3
        return how


def bump(obj: Any, seen: set[int]) -> None:
    """Change every tensor's bytes in place."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            with torch.no_grad():
                obj.add_(1)
    elif isinstance(obj, dict | list | tuple) and id(obj) not in seen:
        seen.add(id(obj))
        for value in obj.values() if isinstance(obj, dict) else obj:
            bump(value, seen)


@pytest.mark.parametrize("seed", range(40))
def test_random_nested_states_changed_at_random_are_staged_exactly(seed: int) -> None:
    """Against a fresh stager's traversal of the same state, stage after
    stage; the unchanged stages replay."""
    fuzz = _Fuzz(seed)
    state = fuzz.state()
    stager = StateDictStager()
    stager.stage(state)
    replayed = 0
    for _ in range(6):
        how = fuzz.change(state)
        bump(state, set())
        before = stager._replay
        out = stager.stage(state)
        assert_like_traversal(out, StateDictStager().stage(state))
        if before is not None and stager._replay is before:
            replayed += 1
        elif how == "none":
            assert before is None, "an unchanged state that replayed before did not replay"
    if seed == 0:
        assert replayed, "the replay never ran"
