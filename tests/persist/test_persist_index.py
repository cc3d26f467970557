"""The state index (``aiostage._persist._index``): written beside ``data.pkl``
where the state is made of plain types, read instead of unpickling, and
never trusted over the pickle when it is missing, stale or malformed."""

from __future__ import annotations

import collections
import json
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from _compare import ALL_DTYPES, assert_same
from _frees import watch_frees

import aiostage
from aiostage import CorruptCheckpointError
from aiostage._load import _records
from aiostage._persist import _archive, _index


def model_state() -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    return model.state_dict()  # an OrderedDict with a _metadata attribute


def nested_state() -> Any:
    return {
        "model": model_state(),
        "optim": {
            "state": {i: {"step": i, "exp_avg": torch.full((3,), float(i))} for i in range(4)},
            "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3], "fused": None}],
        },
        "step": 3,
    }


def views_state() -> Any:
    base = torch.arange(24.0)
    return {
        "whole": base,
        "again": base,  # the same tensor twice: one tensor after the load
        "slice": base[2:8],
        "t": base[4:16].view(3, 4).t(),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }


def scalars_state() -> Any:
    return {
        "s": "é\ud800 text",
        1: -(10**30),
        2.5: [True, False, None, -0.0, 1e308],
        None: ("tuple", 1),
        False: [],
        "od": collections.OrderedDict(b=1, a=2),
    }


def dtypes_state() -> Any:
    return {str(d): torch.ones(5).to(d) for d in ALL_DTYPES}


STATES: dict[str, Callable[[], Any]] = {
    "model": model_state,
    "nested": nested_state,
    "views": views_state,
    "scalars": scalars_state,
    "dtypes": dtypes_state,
    "list_root": lambda: [torch.ones(2), {"a": torch.zeros(3)}],
    "expanded": lambda: {"e": torch.ones(1).expand(5)},
    "scalar_root": lambda: 7,
}


def records_of(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return zf.namelist()


def has_index(path: Path) -> bool:
    return any(n.endswith("/" + _index.INDEX_NAME) for n in records_of(path))


def assert_like_torch(got: Any, want: Any) -> None:
    """``assert_same``, and what it does not look at: an OrderedDict's
    attributes, and which tensors are one object."""
    assert_same(got, want)

    def walk(a: Any, b: Any) -> None:
        if isinstance(b, collections.OrderedDict):
            assert vars(a) == vars(b)
        if isinstance(b, dict):
            for k in b:
                walk(a[k], b[k])
        elif isinstance(b, (list, tuple)):
            for x, y in zip(a, b, strict=True):
                walk(x, y)

    walk(got, want)
    if isinstance(want, dict) and "again" in want:
        assert (got["again"] is got["whole"]) == (want["again"] is want["whole"])


def unpickling_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def unpickle(*args: Any) -> Any:
        raise AssertionError("unpickled: the index was not used")

    monkeypatch.setattr(_records, "unpickle", unpickle)


def count_unpickles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = _records.unpickle

    def unpickle(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(_records, "unpickle", unpickle)
    return calls


def zeroed(state: Any) -> Any:
    """``state`` with every tensor's values zeroed in place (for ``into``)."""
    if isinstance(state, torch.Tensor):
        state.zero_()
    elif isinstance(state, dict):
        for v in state.values():
            zeroed(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            zeroed(v)
    return state


async def load_as(path: Path, mode: str) -> Any:
    """``aiostage.load`` of ``path``: ``plain``, ``mmap``, or ``into`` a
    zeroed copy of the state (read by ``torch.load``)."""
    if mode == "plain":
        return await aiostage.load(path)
    if mode == "mmap":
        return await aiostage.load(path, mmap=True)
    return await aiostage.load(path, into=zeroed(torch.load(path, weights_only=True)))


NOT_INTO = {"scalar_root", "expanded"}
"""States ``into`` cannot take: no tensor, or one with elements sharing memory."""


@pytest.mark.parametrize(
    ("name", "mode"),
    [(n, m) for n in STATES for m in ("plain", "mmap", "into") if m != "into" or n not in NOT_INTO],
)
async def test_a_state_loaded_from_its_index_is_the_one_torch_load_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, mode: str
) -> None:
    path = await aiostage.persist(STATES[name](), tmp_path / "ckpt.pt")
    assert has_index(path)
    want = torch.load(path, weights_only=True)  # torch ignores the extra record
    assert_like_torch(torch.load(path, weights_only=True, mmap=True), want)
    unpickling_forbidden(monkeypatch)
    got = await load_as(path, mode)
    assert_like_torch(got, want)


class Pair(NamedTuple):
    a: int
    b: int


def shared_list() -> Any:
    items = [1, 2]
    return {"a": items, "b": items}


def deep() -> Any:
    state: Any = torch.ones(1)
    for _ in range(300):
        state = [state]
    return state


def tagged() -> Any:
    t = torch.ones(2)
    t.note = "kept"  # type: ignore[attr-defined]
    return {"t": t}


UNINDEXED: dict[str, Callable[[], Any]] = {
    "parameter": lambda: {"p": torch.nn.Parameter(torch.ones(2))},
    "requires_grad": lambda: {"g": torch.ones(2, requires_grad=True)},
    "size": lambda: {"s": torch.Size([2, 3]), "t": torch.ones(1)},
    "dtype": lambda: {"d": torch.float32},
    "namedtuple": lambda: {"p": Pair(1, 2)},
    "bytes": lambda: {"b": b"raw"},
    "complex": lambda: {"c": 1 + 2j},
    "set": lambda: {"s": {1, 2}},
    "uint16": lambda: {"u": torch.ones(2, dtype=torch.uint16)},
    "tensor_attribute": tagged,
    "container_twice": shared_list,
    "tuple_key": lambda: {(1, 2): torch.ones(1)},
    "too_deep": deep,
}


@pytest.mark.parametrize("name", list(UNINDEXED))
async def test_a_state_the_index_cannot_describe_gets_none_and_is_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    path = await aiostage.persist(UNINDEXED[name](), tmp_path / "ckpt.pt")
    assert not has_index(path)
    calls = count_unpickles(monkeypatch)
    got = await aiostage.load(path, safe_globals=[Pair, torch.Size])
    assert_same(got, torch.load(path, weights_only=False))
    assert calls == [1]
    if name == "container_twice":
        assert got["a"] is got["b"]  # identity, which only the pickle keeps


def rewrite_index(monkeypatch: pytest.MonkeyPatch, change: Callable[[bytes], bytes]) -> None:
    real = _index.encode

    def encode(obj: Any, plain: Any, pickled: bytes) -> bytes | None:
        data = real(obj, plain, pickled)
        assert data is not None
        return change(data)

    monkeypatch.setattr(_index, "encode", encode)


def break_a_dtype(data: bytes) -> bytes:
    return data.replace(b'"float32"', b'"float99"', 1)


def drop_the_last_line(data: bytes) -> bytes:
    return data.rsplit(b"\n", 1)[0]


def another_pickle(data: bytes) -> bytes:
    head, ops = data.split(b"\n", 1)
    header = json.loads(head)
    header["pickle_crc"] ^= 1  # written for another data.pkl
    return json.dumps(header).encode() + b"\n" + ops


@pytest.mark.parametrize("mode", ["plain", "mmap", "into"])
@pytest.mark.parametrize("change", [break_a_dtype, drop_the_last_line, another_pickle])
async def test_a_malformed_or_stale_index_is_passed_over_for_the_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[bytes], bytes], mode: str
) -> None:
    rewrite_index(monkeypatch, change)
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(2000)}
    state["meta"] = {"step": 1}  # type: ignore[assignment]
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    assert has_index(path)
    calls = count_unpickles(monkeypatch)
    got = await load_as(path, mode)
    assert calls == [1]
    assert_same(got, state)


async def test_with_the_index_a_damaged_pickle_is_not_read_and_verify_finds_it(
    tmp_path: Path,
) -> None:
    """The index makes a load independent of ``data.pkl``'s bytes; as for a
    storage record's, only ``verify`` checks them."""
    state = {"w": torch.arange(6.0)}
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    with zipfile.ZipFile(path) as zf:
        (info,) = [i for i in zf.infolist() if i.filename.endswith("/data.pkl")]
    raw = bytearray(path.read_bytes())
    local = raw[info.header_offset : info.header_offset + 30]
    name_len, extra_len = (
        int.from_bytes(local[26:28], "little"),
        int.from_bytes(local[28:], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len
    assert raw[start + info.file_size - 1 : start + info.file_size] == b"."  # STOP
    raw[start + info.file_size - 1] = 0xFF
    path.write_bytes(bytes(raw))
    assert_same(await aiostage.load(path), state)
    with pytest.raises(CorruptCheckpointError, match="CRC") as caught:
        await aiostage.load(path, verify=True)
    assert caught.value.record is not None and caught.value.record.endswith("data.pkl")


def test_an_int_too_long_for_json_leaves_the_state_without_an_index() -> None:
    """(``str()`` of an int over 4300 digits raises ValueError.)"""
    assert _archive.pickle_state({"n": 10**5000})[2] is None
    assert _archive.pickle_state({"n": 10**4000})[2] is not None


def index_of(state: Any) -> tuple[bytes, int, dict[str, int]]:
    pickled, records, index = _archive.pickle_state(state)
    assert index is not None
    return index, zlib.crc32(pickled), {r.key: r.nbytes for r in records}


def with_ops(ops: list[Any], count: int | None = None, crc: int = 0) -> bytes:
    header = {"format": "aiostage-index", "version": 1, "pickle_crc": crc}
    header["ops"] = len(ops) if count is None else count
    return (json.dumps(header) + "\n" + json.dumps(ops)).encode()


def fresh(key: str, nbytes: int) -> torch.UntypedStorage:
    return torch.UntypedStorage(nbytes)


T = ["t", "0", "float32", 0, [4], [1]]  # four float32 items of record "0" (16 bytes)

MALFORMED: dict[str, bytes] = {
    "two values left": with_ops([T, 1]),
    "nothing left": with_ops([]),
    "past the record": with_ops([["t", "0", "float32", 1, [4], [1]]]),
    "strided past it": with_ops([["t", "0", "float32", 0, [2], [4]]]),
    "unknown dtype": with_ops([["t", "0", "float99", 0, [4], [1]]]),
    "v3 dtype": with_ops([["t", "0", "uint16", 0, [4], [1]]]),
    "unknown record": with_ops([["t", "9", "float32", 0, [4], [1]]]),
    "negative offset": with_ops([["t", "0", "float32", -1, [4], [1]]]),
    "negative stride": with_ops([["t", "0", "float32", 3, [4], [-1]]]),
    "bool size": with_ops([["t", "0", "float32", 0, [True], [1]]]),
    "sizes and strides differ": with_ops([["t", "0", "float32", 0, [4], [1, 1]]]),
    "reference ahead": with_ops([["r", 0]]),
    "numel overflows": with_ops([["t", "0", "float32", 0, [2**40, 2**40], [0, 0]]]),
    "size past int64": with_ops([["t", "0", "float32", 0, [2**64], [0]]]),
    "list key": with_ops([["l", 0], T, ["d", 1]]),
    "tensor key": with_ops([T, T, ["d", 1]]),
    "pops too many": with_ops([T, ["l", 2]]),
    "unknown op": with_ops([T, ["x", 1]]),
    "op without name": with_ops([T, [], ["l", 2]]),
    "object op": with_ops([{"a": 1}]),
    "attribute not a str": with_ops([1, ["o", 0, 0], 2, 3, ["o", 0, 1]]),
    "dunder attribute": with_ops(["__class__", 1, ["o", 0, 1]]),
    "count differs": with_ops([T], count=2),
    "two dtypes": with_ops([T, ["t", "0", "int32", 0, [4], [1]], ["l", 2]]),
    "not json": b'{"format": "aiostage-index"\n[',
    "other version": with_ops([T]).replace(b'"version": 1', b'"version": 2'),
    "other format": with_ops([T]).replace(b"aiostage-index", b"something-else"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_decoding_a_malformed_index_raises_bad_index(name: str) -> None:
    assert _index.decode(with_ops([T]), 0, {"0": 16}, fresh).shape == (4,)  # (the baseline)
    with pytest.raises(_index.BadIndex):
        _index.decode(MALFORMED[name], 0, {"0": 16}, fresh)


def test_a_record_that_is_not_whole_items_of_its_dtype_is_refused() -> None:
    float64 = with_ops([["t", "0", "float64", 0, [1], [1]]])
    assert _index.decode(float64, 0, {"0": 16}, fresh).shape == (1,)
    with pytest.raises(_index.BadIndex, match="whole number"):
        _index.decode(float64, 0, {"0": 12}, fresh)


def test_the_index_of_many_tensors_is_decoded_a_line_at_a_time_handing_the_gil_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One ``json.loads`` of a whole index of 20,000 tensors would hold the
    GIL for milliseconds in one call: the ops come :data:`OPS_PER_LINE` a
    line, and the decoder offers the GIL at each line, each tensor and each
    key of a dict (the dict of a flat state is one op: building it held the
    GIL 6-7 ms); it frees its storage table a block at a time."""
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(3000)}
    data, crc, sizes = index_of(state)
    lines = data.split(b"\n")
    ops = 2 * len(state) + 1
    assert len(lines) == 1 + -(-ops // _index.OPS_PER_LINE)
    turns: list[int] = []
    monkeypatch.setattr(_index.GilTurns, "__call__", lambda self: turns.append(1))
    freed = watch_frees(monkeypatch, _index)
    got = _index.decode(data, crc, sizes, fresh)
    assert len(turns) >= 2 * len(state) + len(lines) - 1
    assert list(got) == list(state)
    assert [held for _, held in freed] == [len(state)]  # the storage table


def test_the_encoder_frees_its_ops_a_block_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tuple per tensor and an int: freed in one call when ``encode``
    returned, those of 20,000 tensors held the GIL 5-7 ms."""
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(3000)}
    freed = watch_frees(monkeypatch, _index)
    _archive.pickle_state(state)
    # the ops (a key and a tensor each, and the dict's) and the tensor table
    assert [held for _, held in freed] == [2 * len(state) + 1 + len(state)]


def test_each_storage_is_asked_for_once_and_views_share_it() -> None:
    state = views_state()
    data, crc, sizes = index_of(state)
    asked: list[str] = []

    def storage_for(key: str, nbytes: int) -> torch.UntypedStorage:
        asked.append(key)
        assert nbytes == sizes[key]
        return torch.UntypedStorage(nbytes)

    got = _index.decode(data, crc, sizes, storage_for)
    assert sorted(asked) == sorted(set(asked))
    ptr = got["whole"].untyped_storage().data_ptr()
    assert got["slice"].untyped_storage().data_ptr() == ptr
    assert got["t"].untyped_storage().data_ptr() == ptr
    assert got["again"] is got["whole"]
