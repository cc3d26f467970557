"""The shape of a nested state: recorded once, then used to flatten a state
built the same way and to build its staged copy (``aiostage/_stage/_shape.py``).

The engine replays a state through its shape (see ``test_replay.py``); here
the shape itself: what it refuses, the order of its leaves, and that what it
builds is the copy the traversal would have built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Generator
from typing import Any, TypeVar

import pytest
import torch

from aiostage._stage._shape import Shape, TimeSlice
from aiostage._stage._traverse import format_path

T = TypeVar("T")


def drive(gen: Generator[None, None, T], *, mutate_at: int = -1, mutate: Any = None) -> T:
    """Run a generator to its end, calling ``mutate`` at its ``mutate_at``-th yield."""
    steps = 0
    try:
        while True:
            next(gen)
            if steps == mutate_at:
                mutate()
            steps += 1
    except StopIteration as stop:
        return stop.value


def copy_of(obj: Any) -> Any:
    """A stand-in for a staged copy: the same containers over cloned tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((k, copy_of(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if type(obj) is list:
        return [copy_of(v) for v in obj]
    if type(obj) is tuple:
        items = tuple(copy_of(v) for v in obj)
        return obj if all(a is b for a, b in zip(items, obj, strict=True)) else items
    return obj


def record(
    obj: Any, budget_s: float | None = None
) -> tuple[Shape, list[Any], list[Any], list[str]]:
    out = copy_of(obj)
    recorded = drive(Shape.record(obj, out, TimeSlice(budget_s)))
    assert recorded is not None
    shape, leaves_in, leaves_out, paths = recorded
    return shape, leaves_in, leaves_out, [format_path(p) for p in paths]


def nested() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    betas = (0.9, 0.99)
    return {
        "model": model.state_dict(),
        "optim": {
            "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 2)}},
            "param_groups": [
                {"lr": 0.1, "betas": betas, "params": [0, 1]},
                {"lr": 0.2, "betas": betas, "params": []},
            ],
        },
        "rng": (torch.ones(2), 5),
        "empty": {},
        "step": 3,
    }


def test_leaves_come_in_the_traversals_order_with_their_paths() -> None:
    state = nested()
    shape, leaves_in, leaves_out, paths = record(state)
    assert paths == [
        "model.0.weight",
        "model.0.bias",
        "optim.state.0.step",
        "optim.state.0.exp_avg",
        "optim.param_groups.0.lr",
        "optim.param_groups.0.betas.0",
        "optim.param_groups.0.betas.1",
        "optim.param_groups.0.params.0",
        "optim.param_groups.0.params.1",
        "optim.param_groups.1.lr",
        "optim.param_groups.1.betas.0",
        "optim.param_groups.1.betas.1",
        "rng.0",
        "rng.1",
        "step",
    ]
    assert leaves_in[0] is state["model"]["0.weight"]
    assert leaves_in[-1] == 3
    assert torch.equal(leaves_out[0], leaves_in[0]) and leaves_out[0] is not leaves_in[0]
    flat = drive(shape.flatten(state, TimeSlice(None)))
    assert flat is not None
    assert all(a is b for a, b in zip(flat[0], leaves_in, strict=True))


@pytest.mark.parametrize("budget_s", [None, 0.0])
def test_build_makes_the_copy_the_traversal_makes(budget_s: float | None) -> None:
    state = nested()
    shape, _, _, _ = record(state, budget_s)
    flat = drive(shape.flatten(state, TimeSlice(budget_s)))
    assert flat is not None
    leaves, per_node, metas = flat
    staged = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
    out = drive(shape.build(staged, per_node, metas, TimeSlice(budget_s)))
    assert type(out) is dict and list(out) == list(state)
    model = out["model"]
    assert type(model) is OrderedDict and list(model) == list(state["model"])
    assert model._metadata == state["model"]._metadata
    assert model._metadata is not state["model"]._metadata  # a copy, as the traversal's
    assert model["0.weight"] is staged[0]
    groups = out["optim"]["param_groups"]
    assert type(groups) is list and len(groups) == 2
    # A tuple of atomic values is the caller's own object, shared as it was.
    assert groups[0]["betas"] is state["optim"]["param_groups"][0]["betas"]
    assert groups[1]["betas"] is groups[0]["betas"]
    assert type(out["rng"]) is tuple and out["rng"][0] is staged[12] and out["rng"][1] == 5
    assert out["empty"] == {} and out["empty"] is not state["empty"]
    assert out["optim"]["state"][0]["exp_avg"] is staged[3]


def test_a_state_built_again_the_same_way_flattens() -> None:
    shape, _, _, _ = record(nested())
    other = nested()  # new containers and tensors, the same shape
    flat = drive(shape.flatten(other, TimeSlice(None)))
    assert flat is not None
    assert flat[0][1] is other["model"]["0.bias"]


def change(state: dict[str, Any], how: str) -> None:
    groups = state["optim"]["param_groups"]
    if how == "inner_key_added":
        state["optim"]["state"][0]["exp_avg_sq"] = torch.zeros(1)
    elif how == "inner_key_renamed":
        state["optim"]["state"][1] = state["optim"]["state"].pop(0)
    elif how == "inner_keys_reordered":
        inner = state["optim"]["state"][0]
        state["optim"]["state"][0] = dict(reversed(list(inner.items())))
    elif how == "list_appended":
        groups[0]["params"].append(2)
    elif how == "list_to_tuple":
        groups[0]["params"] = tuple(groups[0]["params"])
    elif how == "tuple_to_list":
        state["rng"] = list(state["rng"])
    elif how == "dict_to_ordered":
        state["optim"] = OrderedDict(state["optim"])
    elif how == "dict_subclass":
        from collections import defaultdict

        state["optim"]["state"] = defaultdict(dict, state["optim"]["state"])
    elif how == "container_to_tensor":
        state["empty"] = torch.ones(1)
    elif how == "dict_shared":
        groups[1] = groups[0]
    elif how == "metadata_dropped":
        del state["model"]._metadata
    elif how == "attribute_on_inner":
        model = state["model"]
        model.extra = 1
    elif how == "root_type":
        state["model"] = dict(state["model"])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "inner_key_added",
        "inner_key_renamed",
        "inner_keys_reordered",
        "list_appended",
        "list_to_tuple",
        "tuple_to_list",
        "dict_to_ordered",
        "dict_subclass",
        "container_to_tensor",
        "dict_shared",
        "metadata_dropped",
        "attribute_on_inner",
        "root_type",
    ],
)
def test_a_state_built_otherwise_does_not_flatten(how: str) -> None:
    state = nested()
    shape, _, _, _ = record(state)
    change(state, how)
    assert drive(shape.flatten(state, TimeSlice(None))) is None
    assert drive(shape.flatten(state, TimeSlice(0.0))) is None


@pytest.mark.parametrize(
    "state",
    [
        torch.ones(2),
        5,
        {"a": {1, 2}},
        {"a": [torch.ones(1), object()]},
        {"a": torch.Size([2])},
        [(1, (2, torch.ones(1))), set()],
    ],
    ids=["tensor", "atomic", "set", "object", "size", "set_in_list"],
)
def test_states_of_other_kinds_are_not_recorded(state: Any) -> None:
    assert drive(Shape.record(state, copy_of(state), TimeSlice(None))) is None


def test_a_container_reached_twice_is_not_recorded() -> None:
    inner = {"w": torch.ones(2)}
    state = {"a": inner, "b": inner}
    assert drive(Shape.record(state, copy_of(state), TimeSlice(None))) is None
    loop: list[Any] = [1]
    loop.append(loop)
    assert drive(Shape.record({"x": loop}, {"x": [1, []]}, TimeSlice(None))) is None


def test_a_container_shared_since_the_record_does_not_flatten() -> None:
    """The traversal would copy a container reached twice once and share the
    copy; a flattened replay would make two, so it must not apply."""
    state = {"a": {"w": torch.ones(2)}, "b": {"w": torch.zeros(2)}}
    shape, _, _, _ = record(state)
    state["b"] = state["a"]
    assert drive(shape.flatten(state, TimeSlice(None))) is None


def test_a_copy_of_another_shape_is_not_recorded() -> None:
    state = nested()
    out = copy_of(state)
    out["optim"]["param_groups"].append({})
    assert drive(Shape.record(state, out, TimeSlice(None))) is None


def leaves_of(obj: Any) -> list[Any]:
    """The leaves of a state, depth first, as the traversal visits them."""
    if type(obj) in (dict, OrderedDict):
        return [leaf for value in obj.values() for leaf in leaves_of(value)]
    if type(obj) in (list, tuple):
        return [leaf for value in obj for leaf in leaves_of(value)]
    return [obj]


def many_dicts() -> dict[str, Any]:
    state = nested()
    state["optim"]["state"] = {i: {"step": torch.tensor(float(i))} for i in range(300)}
    return state


@pytest.mark.parametrize("at", range(8))
def test_a_state_changed_while_the_shape_records_or_flattens_is_never_misread(at: int) -> None:
    """The caller's loop runs while the generators wait; a container changed
    then is read whole, before the change, or refused: never half."""
    state = many_dicts()
    before = leaves_of(state)
    mutated = []

    def mutate() -> None:
        inner = state["optim"]["state"]
        inner[7] = {"step": torch.tensor(-1.0)}  # a new container in place of one
        inner[400] = {"step": torch.tensor(-2.0)}  # and one more
        mutated.append(True)

    recording = Shape.record(state, copy_of(state), TimeSlice(0.0))
    recorded = drive(recording, mutate_at=at, mutate=mutate)
    if not mutated:
        assert recorded is not None
    if recorded is not None:
        assert len(recorded[1]) == recorded[0].leaf_count
        assert all(a is b for a, b in zip(recorded[1], before, strict=True))

    state = many_dicts()
    before = leaves_of(state)
    shape, _, _, _ = record(state)
    mutated.clear()
    flat = drive(shape.flatten(state, TimeSlice(0.0)), mutate_at=at, mutate=mutate)
    if not mutated:
        assert flat is not None
    if flat is not None:
        assert all(a is b for a, b in zip(flat[0], before, strict=True))


def test_every_step_over_many_containers_gives_the_loop_turns() -> None:
    """Recording (walking, then numbering the containers), flattening and
    building all yield as they go: a step that did not held the loop for 32
    ms over 20,000 small dicts."""
    state = {"state": {i: {"w": torch.ones(1), "step": i} for i in range(3000)}}

    def places(gen: Generator[None, None, Any]) -> tuple[set[str], Any]:
        seen = set()
        try:
            while True:
                next(gen)
                inner: Any = gen
                while getattr(inner, "gi_yieldfrom", None) is not None:
                    inner = inner.gi_yieldfrom
                seen.add(inner.gi_code.co_name)
        except StopIteration as stop:
            return seen, stop.value

    seen, recorded = places(Shape.record(state, copy_of(state), TimeSlice(0.0)))
    assert {"record", "_compile"} <= seen
    shape = recorded[0]
    seen, flat = places(shape.flatten(state, TimeSlice(0.0)))
    assert seen == {"flatten"}
    seen, _ = places(shape.build(flat[0], flat[1], flat[2], TimeSlice(0.0)))
    assert seen == {"build"}
