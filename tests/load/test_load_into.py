"""aiostage.load(path, into=state): read a checkpoint into existing tensors."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from _compare import write

import aiostage
from aiostage import StateMismatchError
from aiostage._load import _into

Pair = namedtuple("Pair", ["a", "b"])


def fresh_like(state: Any) -> Any:
    """The same structure, every tensor replaced by a new one of garbage."""
    if isinstance(state, torch.Tensor):
        out = torch.empty_like(state)
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.zero_()
        return torch.nn.Parameter(out) if isinstance(state, torch.nn.Parameter) else out
    if isinstance(state, dict):
        return type(state)((k, fresh_like(v)) for k, v in state.items())
    if isinstance(state, list):
        return [fresh_like(v) for v in state]
    if isinstance(state, tuple):
        items = [fresh_like(v) for v in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    return state


def state_on_disk() -> dict[str, Any]:
    base = torch.arange(100, dtype=torch.float32)
    return {
        "model": OrderedDict(w=torch.randn(64, 32), b=torch.randn(32).to(torch.bfloat16)),
        "views": [base[:10], base[50:].view(5, 10)],  # one storage, two views
        "steps": torch.tensor(12, dtype=torch.int64),
        "pair": Pair(torch.randn(3), torch.ones(2, dtype=torch.bool)),
        "empty": torch.empty(0),
        "meta": {"epoch": 3, "name": "run"},
    }


@pytest.mark.parametrize("writer", ["aiostage", "torch.save"])
async def test_reads_into_the_given_tensors(tmp_path: Path, writer: str) -> None:
    state = state_on_disk()
    path = await write(writer, state, tmp_path / "ckpt.pt")
    into = fresh_like(state)
    ptrs = [into["model"]["w"].data_ptr(), into["views"][1].data_ptr()]
    got = await aiostage.load(path, into=into, safe_globals=[Pair])
    # Same tensor objects, same memory, now holding the checkpoint's bytes.
    assert got["model"]["w"] is into["model"]["w"] and got["views"][1] is into["views"][1]
    assert [into["model"]["w"].data_ptr(), into["views"][1].data_ptr()] == ptrs
    for key in ("w", "b"):
        assert torch.equal(into["model"][key], state["model"][key])
    assert torch.equal(into["views"][0], state["views"][0])
    assert torch.equal(into["views"][1], state["views"][1])
    assert into["steps"].item() == 12
    assert torch.equal(into["pair"].a, state["pair"].a) and into["pair"].b.all()
    assert isinstance(got["model"], OrderedDict) and isinstance(got["pair"], Pair)
    assert got["meta"] == {"epoch": 3, "name": "run"}


def test_dense_records_are_read_in_place_and_shared_ones_copied(tmp_path: Path) -> None:
    """The plan: a record that is exactly one dense tensor goes straight into
    its destination; a storage under two views goes through scratch memory."""
    state = state_on_disk()
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    keys: dict[int, str] = {}
    sizes: dict[str, int] = {}
    metas: list[torch.UntypedStorage] = []

    def meta_for(key: str, nbytes: int) -> torch.UntypedStorage:
        metas.append(torch.UntypedStorage(nbytes, device="meta"))
        keys[metas[-1]._cdata] = key
        sizes[key] = nbytes
        return metas[-1]

    from aiostage._load import _records

    loaded = _records.unpickle(str(path), _pickle_of(path), meta_for, _allow_pair)
    into = fresh_like(state)
    placement = _into.place(path, loaded, into, keys, sizes)
    in_place = {s.data_ptr() + offset for s, offset in placement.targets.values()}
    assert into["model"]["w"].data_ptr() in in_place
    assert into["pair"].a.data_ptr() in in_place
    copied = [d for _, _, d in placement.copies]
    assert any(d is into["views"][0] for d in copied)
    assert any(d is into["views"][1] for d in copied)


def _pickle_of(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


def _allow_pair() -> Any:
    return torch.serialization.safe_globals([Pair])


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        (lambda s: s["model"].__setitem__("w", torch.empty(32, 64)), "model.w", "shape"),
        (lambda s: s["model"].__setitem__("b", torch.empty(32)), "model.b", "bfloat16"),
        (lambda s: s["model"].pop("w"), "model.w", "into has nothing"),
        (lambda s: s["model"].__setitem__("extra", torch.empty(1)), "model.extra", "lacks"),
        (lambda s: s.__setitem__("views", [torch.empty(10)]), "views", "2 items"),
        (lambda s: s.__setitem__("steps", 12), "steps", "int"),
    ],
)
async def test_mismatch_names_key_and_writes_nothing(
    tmp_path: Path, change: Any, key: str, message: str
) -> None:
    state = state_on_disk()
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    into = fresh_like(state)
    change(into)
    with pytest.raises(StateMismatchError, match=message) as info:
        await aiostage.load(path, into=into, safe_globals=[Pair])
    assert info.value.key == key
    assert str(path) in str(info.value)
    assert into["pair"].a.isnan().all()  # nothing was read into into


async def test_into_refuses_mmap_and_other_devices(tmp_path: Path) -> None:
    path = await aiostage.persist({"w": torch.randn(3)}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="into"):
        await aiostage.load(path, into={"w": torch.empty(3)}, mmap=True)
    with pytest.raises(ValueError, match="into"):
        await aiostage.load(path, into={"w": torch.empty(3)}, map_location="meta")


async def test_into_a_model_restores_it(tmp_path: Path) -> None:
    """The use it is for: restore a model's parameters where they are."""
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    path = await aiostage.persist(trained.state_dict(), tmp_path / "ckpt.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    params = [p.data_ptr() for p in fresh.parameters()]
    await aiostage.load(path, into=fresh.state_dict())
    assert [p.data_ptr() for p in fresh.parameters()] == params
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), trained(x))


async def test_a_state_dicts_metadata_is_kept(tmp_path: Path) -> None:
    """A ``state_dict()`` is an OrderedDict with a ``_metadata`` attribute
    (versions, read by ``load_state_dict``): the result has it, as a plain
    load's has."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    path = await aiostage.persist(model.state_dict(), tmp_path / "ckpt.pt")
    got = await aiostage.load(path, into=model.state_dict())
    assert got._metadata == model.state_dict()._metadata
    assert got._metadata["1"]["version"] == 2  # (BatchNorm's)


async def test_an_expanded_destination_is_a_mismatch(tmp_path: Path) -> None:
    """Elements that share memory cannot each receive a value: refused up
    front, naming the key, instead of a RuntimeError from the copy."""
    path = await aiostage.persist({"e": torch.arange(5.0)}, tmp_path / "ckpt.pt")
    into = {"e": torch.zeros(1).expand(5)}
    with pytest.raises(StateMismatchError, match="share memory") as info:
        await aiostage.load(path, into=into)
    assert info.value.key == "e"


async def test_non_contiguous_destination_is_copied(tmp_path: Path) -> None:
    w = torch.randn(6, 4)
    path = await aiostage.persist({"w": w}, tmp_path / "ckpt.pt")
    dst = torch.empty(4, 6).t()  # (6, 4), not contiguous
    await aiostage.load(path, into={"w": dst})
    assert torch.equal(dst, w)
