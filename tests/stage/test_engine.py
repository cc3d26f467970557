"""StateDictStager: the blocking copy engine's semantics."""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import types
from typing import Any, NamedTuple

import pytest
import torch
from _compare import ALL_DTYPES

from aiostage import CacheInfo, StagingError, StateDictStager
from aiostage._stage._cpu_copy import copy_batch


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# -- 1. storage sharing ----------------------------------------------------------


def test_views_share_one_cpu_storage_with_same_geometry() -> None:
    a = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    b = torch.arange(16, 32, dtype=torch.float32).reshape(4, 4)
    sd = {"a": a, "a_flat": a.view(16), "a_t": a.t(), "b": b, "b_narrow": b.narrow(0, 1, 2)}
    stager = StateDictStager()
    out = stager.stage(sd)

    assert storage_ptr(out["a"]) == storage_ptr(out["a_flat"]) == storage_ptr(out["a_t"])
    assert storage_ptr(out["b"]) == storage_ptr(out["b_narrow"])
    assert storage_ptr(out["a"]) != storage_ptr(out["b"])
    for key, src in sd.items():
        dst = out[key]
        assert dst.storage_offset() == src.storage_offset(), key
        assert dst.shape == src.shape and dst.stride() == src.stride(), key
        assert torch.equal(dst, src), key
    # a 4x4, its view, another 4x4 and a narrow of that: 2 storages, 128 bytes
    assert stager.cache_info() == CacheInfo(storages=2, nbytes=128)


def test_slices_of_one_storage_stay_slices() -> None:
    base = torch.arange(100, dtype=torch.int64)
    sd = [base[10:20], base[50:], base[::3]]
    out = StateDictStager().stage(sd)
    assert len({storage_ptr(t) for t in out}) == 1
    assert [t.storage_offset() for t in out] == [10, 50, 0]
    assert out[2].stride() == (3,)
    assert all(torch.equal(a, b) for a, b in zip(out, sd, strict=True))


# -- 2. caching ------------------------------------------------------------------


def test_second_stage_reuses_storages_and_holds_new_values() -> None:
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    stager = StateDictStager()
    first = stager.stage(sd)
    info = stager.cache_info()
    ptrs = {k: v.data_ptr() for k, v in first.items()}

    sd["w"].mul_(2)
    sd["b"].add_(1)
    second = stager.stage(sd)
    assert {k: v.data_ptr() for k, v in second.items()} == ptrs
    assert stager.cache_info() == info
    assert torch.equal(second["w"], sd["w"]) and torch.equal(second["b"], sd["b"])


def test_cache_entry_dropped_when_source_storage_dies() -> None:
    stager = StateDictStager()
    keep = torch.randn(10)
    replaced = torch.randn(1000)
    staged = stager.stage({"keep": keep, "replaced": replaced})
    assert stager.cache_info().storages == 2
    del staged, replaced
    gc.collect()
    assert stager.cache_info() == CacheInfo(1, 40)
    # A run that keeps replacing a tensor does not grow the cache.
    for _ in range(20):
        stager.stage({"keep": keep, "new": torch.randn(1000)})
        gc.collect()
    assert stager.cache_info() == CacheInfo(1, 40)


def test_resized_source_gets_a_fresh_staging_storage() -> None:
    stager = StateDictStager()
    t = torch.randn(10)
    stager.stage(t)
    t.resize_(1000)
    t.normal_()
    out = stager.stage(t)
    assert torch.equal(out, t)
    assert stager.cache_info() == CacheInfo(1, 4000)


def test_close_releases_the_cache() -> None:
    stager = StateDictStager()
    sd = {"a": torch.randn(8)}
    stager.stage(sd)
    stager.close()
    assert stager.cache_info() == CacheInfo(0, 0)


# -- 3. independence ----------------------------------------------------------------


def test_cpu_tensors_are_copied_not_aliased() -> None:
    src = torch.randn(32)
    out = StateDictStager().stage({"t": src})["t"]
    assert storage_ptr(out) != storage_ptr(src)
    expected = src.clone()
    src.add_(100)
    assert torch.equal(out, expected)


# -- 4. containers -------------------------------------------------------------------


class Point(NamedTuple):
    x: torch.Tensor
    label: str


@dataclasses.dataclass
class Inner:
    t: torch.Tensor
    n: int = 3


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner
    others: list[torch.Tensor]


class WithSlots:
    __slots__ = ("name", "t")

    def __init__(self, t: torch.Tensor, name: str) -> None:
        self.t = t
        self.name = name


class WithDict:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.meta = {"k": 1}


class CustomDeepcopy:
    def __init__(self, value: int) -> None:
        self.value = value
        self.copied = False

    def __deepcopy__(self, memo: dict[int, Any]) -> CustomDeepcopy:
        out = CustomDeepcopy(self.value)
        out.copied = True
        return out


class CustomReduce:
    def __init__(self, t: torch.Tensor, scale: float) -> None:
        self.t = t
        self.scale = scale

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (CustomReduce, (self.t, self.scale))


def test_dicts_keep_key_order_and_types() -> None:
    od = collections.OrderedDict([("z", torch.ones(1)), ("a", torch.zeros(1))])
    sd = {"b": 1, "a": od, "c": [torch.ones(2), "x"]}
    out = StateDictStager().stage(sd)
    assert list(out) == ["b", "a", "c"]
    assert type(out["a"]) is collections.OrderedDict and list(out["a"]) == ["z", "a"]
    assert isinstance(out["c"], list) and out["c"][1] == "x"
    assert torch.equal(out["a"]["z"], od["z"]) and out["a"]["z"] is not od["z"]


def test_tuples_and_namedtuples() -> None:
    unchanged = (1, "two", None)
    p = Point(torch.arange(3.0), "p")
    out = StateDictStager().stage({"u": unchanged, "p": p, "t": (torch.ones(2), 5)})
    assert out["u"] is unchanged
    assert type(out["p"]) is Point and out["p"].label == "p"
    assert torch.equal(out["p"].x, p.x) and out["p"].x is not p.x
    assert type(out["t"]) is tuple and out["t"][1] == 5


def test_dataclasses_slots_dict_and_custom_copy_protocols() -> None:
    shared = torch.randn(5)
    obj = Outer(inner=Inner(shared), others=[shared[1:], torch.ones(1)])
    sd = {
        "dc": obj,
        "slots": WithSlots(torch.ones(3), "s"),
        "dict": WithDict(torch.zeros(2)),
        "deep": CustomDeepcopy(7),
        "reduce": CustomReduce(torch.full((2,), 2.0), 0.5),
    }
    out = StateDictStager().stage(sd)
    dc = out["dc"]
    assert type(dc) is Outer and type(dc.inner) is Inner and dc.inner.n == 3
    assert torch.equal(dc.inner.t, shared) and dc.inner.t is not shared
    assert storage_ptr(dc.inner.t) == storage_ptr(dc.others[0])
    assert dc.others[0].storage_offset() == 1
    assert out["slots"].name == "s" and torch.equal(out["slots"].t, torch.ones(3))
    assert out["dict"].meta == {"k": 1} and out["dict"].meta is not sd["dict"].meta
    assert out["deep"].copied and out["deep"].value == 7
    assert out["reduce"].scale == 0.5 and out["reduce"].t is not sd["reduce"].t
    assert torch.equal(out["reduce"].t, sd["reduce"].t)


def test_recursive_and_shared_structures_copied_once() -> None:
    sub = {"t": torch.ones(2)}
    loop: list[Any] = [sub]
    loop.append(loop)
    sd = {"a": sub, "b": sub, "loop": loop}
    out = StateDictStager().stage(sd)
    assert out["a"] is out["b"]
    assert out["a"] is not sub
    assert out["loop"][1] is out["loop"]
    assert out["loop"][0] is out["a"]
    self_ref = WithDict(torch.ones(1))
    self_ref.meta = {"me": self_ref}  # type: ignore[dict-item]
    staged = StateDictStager().stage(self_ref)
    assert staged.meta["me"] is staged


def test_atomic_values_come_back_as_they_are() -> None:
    def fn() -> None:
        pass

    atoms = [1, 2.5, "s", b"b", None, int, fn, len, torch.float16, torch.device("cpu"), True]
    out = StateDictStager().stage(atoms)
    assert out is not atoms
    assert all(a is b for a, b in zip(out, atoms, strict=True))


def test_bound_methods_are_rebound_to_the_copy() -> None:
    obj = WithDict(torch.ones(1))
    out = StateDictStager().stage({"obj": obj, "m": obj.__init__})
    assert isinstance(out["m"], types.MethodType)
    assert out["m"].__self__ is out["obj"]


# -- 5. tensors ---------------------------------------------------------------------


def test_tensor_attributes_requires_grad_and_parameter_survive() -> None:
    t = torch.randn(3)
    t.a = 42  # type: ignore[attr-defined]
    t.note = {"x": [1, 2]}  # type: ignore[attr-defined]
    p = torch.nn.Parameter(torch.randn(2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    g = torch.randn(2, requires_grad=True)
    out = StateDictStager().stage({"t": t, "p": p, "frozen": frozen, "g": g})
    assert out["t"].a == 42 and out["t"].note == {"x": [1, 2]}
    assert out["t"].note is not t.note  # type: ignore[attr-defined]
    assert type(out["p"]) is torch.nn.Parameter and out["p"].requires_grad
    assert type(out["frozen"]) is torch.nn.Parameter and not out["frozen"].requires_grad
    assert out["g"].requires_grad and out["g"].is_leaf
    assert torch.equal(out["p"].detach(), p.detach())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips(dtype: torch.dtype) -> None:
    src = (torch.randn(7, 3) * 50).to(dtype)
    out = StateDictStager().stage(src)
    assert out.dtype == dtype and torch.equal(out, src)


@pytest.mark.parametrize("shape", [(), (0,), (0, 0), (0, 0, 0)], ids=str)
def test_empty_tensors_keep_shape_and_dtype(shape: tuple[int, ...]) -> None:
    src = torch.zeros(shape, dtype=torch.float64) if shape else torch.tensor(3.5)
    out = StateDictStager().stage({"e": src})["e"]
    assert out.shape == src.shape and out.dtype == src.dtype
    assert torch.equal(out, src)


def test_conjugate_and_negative_views_keep_their_values() -> None:
    z = torch.randn(4, dtype=torch.complex64)
    out = StateDictStager().stage({"conj": z.conj(), "z": z})
    assert out["conj"].is_conj()
    assert torch.equal(out["conj"].resolve_conj(), z.conj().resolve_conj())
    assert storage_ptr(out["conj"]) == storage_ptr(out["z"])


# -- errors -----------------------------------------------------------------------------


def test_unstageable_leaf_names_its_path_and_caches_nothing() -> None:
    stager = StateDictStager()
    good = torch.randn(4)
    sd = {
        "model": {"w": good},
        "optimizer": {"state": {3: {"exp_avg": torch.randn(3, 3).to_sparse()}}},
    }
    with pytest.raises(StagingError) as info:
        stager.stage(sd)
    assert info.value.path == "optimizer.state.3.exp_avg"
    assert "optimizer.state.3.exp_avg" in str(info.value)
    assert stager.cache_info() == CacheInfo(0, 0)


def test_meta_tensor_is_refused_with_its_path() -> None:
    with pytest.raises(StagingError, match="meta") as info:
        StateDictStager().stage({"layer": [torch.empty(3, device="meta")]})
    assert info.value.path == "layer.0"


def test_object_failing_to_copy_is_reported_with_cause() -> None:
    class Broken:
        def __reduce_ex__(self, protocol: Any) -> Any:
            raise ValueError("nope")

    with pytest.raises(StagingError) as info:
        StateDictStager().stage({"a": {"b": Broken()}})
    assert info.value.path == "a.b"
    assert isinstance(info.value.__cause__, ValueError)


def test_type_check_refuses_arbitrary_objects() -> None:
    with pytest.raises(StagingError, match="type_check") as info:
        StateDictStager().stage({"x": [WithDict(torch.ones(1))]}, type_check=True)
    assert info.value.path == "x.0"


# -- 6. pinned and shared memory -------------------------------------------------------


def test_share_memory_stages_into_shared_storages() -> None:
    out = StateDictStager(share_memory=True).stage({"a": torch.randn(100), "b": torch.ones(3)})
    assert out["a"].is_shared() and out["b"].is_shared()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the no-accelerator path")
def test_pin_memory_without_accelerator_warns_once_and_is_ignored() -> None:
    with pytest.warns(RuntimeWarning, match="pin_memory"):
        stager = StateDictStager(pin_memory=True)
    out = stager.stage({"a": torch.randn(100)})
    out2 = stager.stage({"b": torch.randn(100)})  # no second warning (filterwarnings=error)
    assert not out["a"].is_pinned() and not out2["b"].is_pinned()


def test_negative_pin_threshold_is_rejected() -> None:
    with pytest.raises(ValueError, match="pin_memory_min_bytes"):
        StateDictStager(pin_memory_min_bytes=-1)


# -- the staged-tensor cache ---------------------------------------------------------


def test_unchanged_tensors_are_staged_to_the_same_objects() -> None:
    stager = StateDictStager()
    sd = {"w": torch.randn(8), "p": torch.nn.Parameter(torch.randn(3))}
    first = stager.stage(sd)
    sd["w"].add_(1)
    second = stager.stage(sd)
    assert second["w"] is first["w"] and second["p"] is first["p"]
    assert torch.equal(second["w"], sd["w"])


def test_changed_tensors_are_rebuilt() -> None:
    stager = StateDictStager()
    t = torch.randn(8)
    p = torch.nn.Parameter(torch.randn(4))
    first = stager.stage({"t": t, "p": p})
    t.data = torch.arange(6, dtype=torch.float64).reshape(2, 3)  # new storage, dtype, shape
    p.requires_grad_(False)
    second = stager.stage({"t": t, "p": p})
    assert second["t"] is not first["t"]
    assert second["t"].dtype == torch.float64 and second["t"].shape == (2, 3)
    assert torch.equal(second["t"], t)
    assert not second["p"].requires_grad and first["p"].requires_grad
    t.resize_(12)
    t.copy_(torch.arange(12, dtype=torch.float64))
    third = stager.stage({"t": t})
    assert third["t"].shape == (12,) and torch.equal(third["t"], t)
    t.note = "added"  # type: ignore[attr-defined]
    fourth = stager.stage({"t": t})
    assert fourth["t"].note == "added"
    assert not hasattr(third["t"], "note")


def test_transposed_view_reuse_keeps_geometry() -> None:
    stager = StateDictStager()
    base = torch.randn(3, 5)
    sd = {"t": base.t()}
    stager.stage(sd)
    sd["t"] = base  # same storage, different geometry, different tensor object
    out = stager.stage(sd)
    assert out["t"].shape == (3, 5) and torch.equal(out["t"], base)


def test_replaced_tensors_reuse_retired_staging_storages() -> None:
    stager = StateDictStager()
    sd = {"a": torch.randn(1000), "b": torch.randn(10)}
    first = stager.stage(sd)
    old_ptr = first["a"].untyped_storage().data_ptr()
    del first
    sd["a"] = torch.randn(1000)  # the old source storage dies
    gc.collect()
    second = stager.stage(sd)
    # Same size: the retired staging storage is taken instead of a new one.
    assert second["a"].untyped_storage().data_ptr() == old_ptr
    assert torch.equal(second["a"], sd["a"])
    assert stager.cache_info() == CacheInfo(2, 4040)


def test_unused_spares_are_released_after_the_next_stage() -> None:
    stager = StateDictStager()
    sd = {"a": torch.randn(1000)}
    stager.stage(sd)
    del sd["a"]
    gc.collect()
    stager.stage(sd)
    assert stager.cache_info() == CacheInfo(0, 0)
    assert stager._cache._spares == {}


def test_staged_results_changed_in_place_are_not_handed_out_again() -> None:
    stager = StateDictStager()
    sd = {"w": torch.arange(6.0), "m": torch.arange(6.0).reshape(2, 3)}
    first = stager.stage(sd)
    first["w"].unsqueeze_(0)
    first["m"].t_()
    first["m"].note = "mine"  # type: ignore[attr-defined]
    second = stager.stage(sd)
    assert second["w"].shape == (6,) and torch.equal(second["w"], sd["w"])
    assert second["m"].shape == (2, 3) and torch.equal(second["m"], sd["m"])
    assert not hasattr(second["m"], "note")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_staging_memory_returns_to_the_os_when_released() -> None:
    stager = StateDictStager()
    sd = {f"t{i}": torch.ones(16 * 1024 * 1024 // 4) for i in range(8)}  # 128 MiB
    gc.collect()
    before = _rss_bytes()
    staged = stager.stage(sd)
    grown = _rss_bytes() - before
    assert grown > 100 * 1024 * 1024  # the staging copy is resident
    del staged
    stager.close()
    gc.collect()
    # The staging memory went back to the OS (not kept in the allocator).
    assert _rss_bytes() - before < 32 * 1024 * 1024


def _run_gen(gen: Any) -> Any:
    """Drive a generator to its end; its return value."""
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


def _plan_of(stager: StateDictStager, state: Any) -> Any:
    return _run_gen(stager.plan(state))


def test_only_newly_allocated_staging_storages_are_marked_fresh() -> None:
    """Fresh (never written) staging memory is copied with one memmove per
    segment; reused buffers, and spares of dead sources, are not fresh."""
    stager = StateDictStager()
    sd = {"a": torch.randn(100_000), "b": torch.randn(10)}
    plan = _plan_of(stager, sd)
    assert [r.fresh for r in plan.requests] == [True, True]
    for batch in plan.batches(16 << 20):
        copy_batch(plan.requests, batch, plan.whole)
    stager.commit(plan)
    assert torch.equal(plan.result["a"], sd["a"]) and torch.equal(plan.result["b"], sd["b"])
    again = _plan_of(stager, sd)
    assert [r.fresh for r in again.requests] == [False, False]
    stager.commit(again)
    del again, plan
    sd["a"] = torch.randn(100_000)  # the old source dies: its buffer is a spare
    gc.collect()
    third = _plan_of(stager, sd)
    assert [r.fresh for r in third.requests] == [False, False]


def test_a_source_shrunk_after_planning_is_an_error_not_an_overread() -> None:
    """The memmove path for fresh buffers checks the bounds first: a source
    storage shrunk between plan and copy is a StagingError naming the key,
    not a read past its end."""
    stager = StateDictStager()
    sd = {"a": torch.randn(100_000)}
    plan = _plan_of(stager, sd)
    assert plan.requests[0].fresh
    sd["a"].untyped_storage().resize_(16)
    with pytest.raises(StagingError, match="shrank") as err:
        for batch in plan.batches(16 << 20):
            copy_batch(plan.requests, batch, plan.whole)
    assert err.value.path == "a"
    stager.discard(plan)


def test_a_reused_buffer_whose_source_shrank_is_an_error_and_the_source_keeps_its_size() -> None:
    """Into a reused buffer the copy goes through byte views: a view past a
    shrunk source's end would make torch grow the caller's storage (and
    copy its new, uninitialised bytes).  It is a StagingError naming the key
    instead, and the source is left as the caller made it."""
    stager = StateDictStager()
    sd = {"a": torch.randn(100_000), "b": torch.randn(300_000)}
    stager.stage(sd)  # the buffers exist: the next plan reuses them
    plan = _plan_of(stager, sd)
    assert not any(r.fresh for r in plan.requests)
    sd["b"].untyped_storage().resize_(16)
    with pytest.raises(StagingError, match="past the end") as err:
        for batch in plan.batches(1 << 16):  # cut: byte views, not whole tensors
            copy_batch(plan.requests, batch, plan.whole)
    assert err.value.path == "b"
    assert sd["b"].untyped_storage().nbytes() == 16
    stager.discard(plan)


def test_a_batched_copy_that_fails_as_a_whole_is_a_staging_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small dense tensors are copied many at once; if only that call fails
    (each copies fine on its own), the caller still gets a StagingError."""
    stager = StateDictStager()
    sd = {f"t{i}": torch.randn(10) for i in range(5)}
    stager.stage(sd)  # reused buffers: copied tensor-to-tensor, not by memmove
    plan = _plan_of(stager, sd)
    assert plan.whole

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated batched copy failure")

    monkeypatch.setattr(torch, "_foreach_copy_", broken)
    with pytest.raises(StagingError, match="at once failed"):
        for batch in plan.batches(16 << 20):
            copy_batch(plan.requests, batch, plan.whole)
    stager.discard(plan)


def _sizes_of(stager: StateDictStager, state: Any) -> list[int]:
    return _run_gen(stager.fresh_sizes(state, 0.0))


def test_fresh_sizes_lists_each_uncached_storage_once() -> None:
    """What a plan would map: one storage per source storage (of 128 KiB or
    more) of the plain tensors in dicts, lists and tuples, none for cached
    ones, none where a retired storage of the size is kept."""
    stager = StateDictStager()
    kib = 1024
    base = torch.zeros(64 * kib)  # 256 KiB
    shared = {
        "view": base[10:20],
        "again": base,
        "other": torch.zeros(20 * kib, dtype=torch.float64),
    }
    state: dict[str, Any] = {
        "model": shared,
        "list": [torch.zeros(40 * kib), (torch.zeros(48 * kib), 4), "x"],
        "small": torch.zeros(10),  # from the heap, by the plan
        "odd": types.SimpleNamespace(t=torch.zeros(64 * kib)),  # left to the plan
        "meta": torch.empty(64 * kib, device="meta"),
    }
    state["loop"] = state  # reached again: walked once
    assert sorted(_sizes_of(stager, state)) == sorted([256 * kib, 160 * kib, 160 * kib, 192 * kib])
    del state["meta"]  # (which the plan refuses)
    plan = _plan_of(stager, state)
    stager.commit(plan)
    assert _sizes_of(stager, state) == []  # all cached now
    # A new tensor of a cached size, while a dead source's storage is kept.
    del plan
    state["list"][0] = torch.ones(40 * kib)  # the old source dies: its storage is a spare
    gc.collect()
    assert _sizes_of(stager, state) == []
    state["list"].append(torch.ones(40 * kib))  # a second one of that size needs one
    assert _sizes_of(stager, state) == [160 * kib]


def test_storages_allocated_ahead_are_taken_by_the_plan_and_marked_fresh() -> None:
    stager = StateDictStager()
    sd = {"a": torch.randn(100_000), "b": torch.randn(50_000), "c": torch.randn(40_000)}
    stager.allocate(_sizes_of(stager, sd))
    ahead = {dst.data_ptr() for dsts in stager._cache._spares.values() for dst in dsts}
    assert len(ahead) == 3
    plan = _plan_of(stager, sd)
    assert {r.dst.data_ptr() for r in plan.requests} == ahead  # no new allocation
    assert [r.fresh for r in plan.requests] == [True, True, True]  # never written yet
    for batch in plan.batches(16 << 20):
        copy_batch(plan.requests, batch, plan.whole)
    stager.commit(plan)
    assert all(torch.equal(plan.result[k], sd[k]) for k in sd)
    assert stager._cache._spares == {} and not stager._cache.untouched


def test_fresh_sizes_gives_the_loop_turns_over_cached_tensors_too() -> None:
    stager = StateDictStager()
    sd = {f"t{i}": torch.zeros(2) for i in range(500)}
    stager.stage(sd)
    gen = stager.fresh_sizes(sd, 0.0)
    turns = 0
    try:
        while True:
            next(gen)
            turns += 1
    except StopIteration as done:
        assert done.value == []
    assert turns >= 500 // 64


def test_a_traversed_plan_groups_its_requests_by_device_as_it_goes() -> None:
    """The traversal groups the requests by source device while it builds
    them (asking 20,000 storages for their device afterwards held the loop
    for 5 ms); the groups are the plan's requests, in order, each once."""
    stager = StateDictStager()
    base = torch.randn(64)
    sd = {"a": torch.randn(8), "view": base[2:10], "b": [torch.randn(3), base], "c": 7}
    plan = _plan_of(stager, sd)
    assert plan._by_device is not None  # grouped during the plan, not on demand
    expected: dict[torch.device, list[int]] = {}
    for index, req in enumerate(plan.requests):
        expected.setdefault(req.src.device, []).append(index)
    assert plan.by_device() == expected == {torch.device("cpu"): [0, 1, 2]}


def test_a_first_stage_leaves_few_collector_tracked_objects_per_tensor() -> None:
    """Every object a first stage leaves alive is scanned by the next young
    collection, which runs on the loop right after the stage (about 1 us an
    object: 18-21 ms for 20,000 tensors).  What stays per tensor: the staged
    tensor, its torch.Size, both storages' Python objects, two keyed weak
    references and a replay one, the cache entry and a tuple; no per-entry
    bound method (one per cache is shared)."""
    count = 2000
    sd = {f"t{i}": torch.randn(4) for i in range(count)}
    stager = StateDictStager()
    gc.collect()
    before = len(gc.get_objects())
    staged = stager.stage(sd)
    gc.collect()
    per_tensor = (len(gc.get_objects()) - before) / count
    assert len(staged) == count
    assert per_tensor < 9.5, per_tensor
