"""persist -> load / torch.load round trips: the file is a real torch.save archive."""

from __future__ import annotations

import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from _compare import ALL_DTYPES, assert_same

import aiostage


def _filled(dtype: torch.dtype, n: int = 37) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(n, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), dtype=dtype, generator=g)


def make_state() -> dict[str, Any]:
    base = torch.arange(48, dtype=torch.float32)
    grid = base.view(6, 8)
    return {
        "dtypes": {str(dt): _filled(dt) for dt in ALL_DTYPES},
        "nested": {
            "list": [torch.randn(3), (torch.ones(2, dtype=torch.int64), 5, "five")],
            "od": OrderedDict([("z", torch.zeros(2)), ("a", torch.full((2, 2), 7.0))]),
        },
        "empties": [
            torch.tensor(3.5),
            torch.empty(0),
            torch.empty(0, 0),
            torch.empty(0, 0, 0),
            torch.empty(0, dtype=torch.int64),
        ],
        "param": torch.nn.Parameter(torch.randn(4, 4)),
        "frozen": torch.nn.Parameter(torch.randn(3), requires_grad=False),
        "base": base,
        "slice": base[5:17],
        "grid": grid,
        "cols": grid[:, 2:5],  # non-contiguous
        "transposed": grid.t(),  # non-contiguous
        "strided": base[1::3],
        "meta": {"step": 12, "lr": 0.5, "name": "run", "none": None, "flag": True},
    }


def _names(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern))  # pathlib's glob matches dot files too


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


def assert_sharing(loaded: dict[str, Any]) -> None:
    ptr = loaded["base"].untyped_storage().data_ptr()
    for key in ("slice", "grid", "cols", "transposed", "strided"):
        assert loaded[key].untyped_storage().data_ptr() == ptr, key
    loaded["base"][6] = 1234.0
    assert loaded["slice"][1].item() == 1234.0


async def test_round_trip_through_aiostage_load(tmp_path: Path) -> None:
    state = make_state()
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    assert path == tmp_path / "ckpt.pt"
    loaded = await aiostage.load(path)
    assert_same(loaded, state)
    assert isinstance(loaded["nested"]["od"], OrderedDict)
    assert_sharing(loaded)


async def test_round_trip_through_torch_load_weights_only(tmp_path: Path) -> None:
    state = make_state()
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    loaded = torch.load(path, weights_only=True)
    assert_same(loaded, state)
    assert_sharing(loaded)


@pytest.mark.parametrize("via", ["aiostage", "torch"])
async def test_mmap_load(tmp_path: Path, via: str) -> None:
    state = make_state()
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    if via == "aiostage":
        loaded = await aiostage.load(path, mmap=True)
    else:
        loaded = torch.load(path, mmap=True, weights_only=True)
    assert_same(loaded, state)
    assert loaded["slice"].untyped_storage().data_ptr() == (
        loaded["base"].untyped_storage().data_ptr()
    )


async def test_records_aligned_and_crcs_correct(tmp_path: Path) -> None:
    path = await aiostage.persist(make_state(), tmp_path / "ckpt.pt")
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        top = names[0].split("/")[0]
        assert names[:4] == [
            f"{top}/data.pkl",
            f"{top}/.format_version",
            f"{top}/.storage_alignment",
            f"{top}/byteorder",
        ]
        assert names[-2:] == [f"{top}/version", f"{top}/.data/serialization_id"]
        assert zf.read(f"{top}/.storage_alignment") == b"64"
        assert zf.read(f"{top}/version") == b"3\n"
        raw = path.read_bytes()
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            n = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
            e = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
            assert (info.header_offset + 30 + n + e) % 64 == 0, info.filename


async def test_forced_zip64_loads(tmp_path: Path) -> None:
    from aiostage._persist._writer import persist

    state = make_state()
    path = await persist(state, tmp_path / "z64.pt", _force_zip64=True)
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw  # zip64 end records
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert_same(torch.load(path, weights_only=True), state)
    assert_same(torch.load(path, weights_only=True, mmap=True), state)
    assert_same(await aiostage.load(path, verify=True), state)


async def test_untyped_storage_and_many_small_storages(tmp_path: Path) -> None:
    from aiostage._persist._writer import persist

    state = {
        "raw": torch.arange(10, dtype=torch.uint8).untyped_storage(),
        "many": [torch.full((i,), float(i)) for i in range(300)],
    }
    # A tiny chunk size forces storages to be split across many writes.
    path = await persist(state, tmp_path / "small.pt", _chunk_bytes=100)
    loaded = torch.load(path, weights_only=True)
    raw = loaded["raw"]
    # torch.load hands an UntypedStorage back wrapped, as for torch.save files.
    assert isinstance(raw, torch.storage.TypedStorage)
    as_bytes = torch.empty(0, dtype=torch.uint8).set_(raw._untyped_storage)
    assert as_bytes.tolist() == list(range(10))
    assert_same(loaded["many"], state["many"])


async def test_wait_ready_gates_each_storage_and_pickle_goes_first(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    tensors = [torch.zeros(1000 + i) for i in range(4)]
    shared_view = tensors[0][10:20]
    state = {"ts": tensors, "view": shared_view}
    seen: list[torch.UntypedStorage] = []
    heads: list[bytes] = []

    async def wait_ready(storage: torch.UntypedStorage) -> None:
        # Simulates the copy landing: the bytes only become right now.
        temps = _names(tmp_path, ".ckpt.pt.aiostage-tmp.*")
        assert len(temps) == 1
        heads.append(_head(temps[0]))
        index = len(seen)
        seen.append(storage)
        torch.empty(0).set_(storage).fill_(float(index + 1))

    from aiostage._persist._writer import persist

    await persist(state, target, wait_ready=wait_ready, _chunk_bytes=1500)
    assert len(seen) == 4  # once per storage, views included in their base
    assert all(s is t.untyped_storage() for s, t in zip(seen, tensors, strict=True))
    assert heads == [b"PK\x03\x04"] * 4  # the pickle/header records were already on disk
    loaded = torch.load(target, weights_only=True)
    for i, t in enumerate(loaded["ts"]):
        assert torch.equal(t, torch.full_like(t, float(i + 1)))
    assert torch.equal(loaded["view"], torch.full((10,), 1.0))


async def test_progress_reports_on_loop_thread_up_to_total(tmp_path: Path) -> None:
    from aiostage._persist._writer import persist

    calls: list[tuple[int, int]] = []
    threads: set[int] = set()

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        threads.add(threading.get_ident())

    state = {"a": torch.randn(10_000), "b": torch.randn(20_000)}
    await persist(state, tmp_path / "p.pt", progress=progress, _chunk_bytes=16_384)
    assert threads == {threading.get_ident()}
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and len(calls) > 3
    total = calls[-1][1]
    assert calls[-1] == (total, total)
    assert total >= 30_000 * 4


async def test_overwrite_replaces_previous(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    await aiostage.persist({"v": torch.ones(3)}, target)
    await aiostage.persist({"v": torch.full((5,), 2.0)}, target)
    assert torch.equal((await aiostage.load(target))["v"], torch.full((5,), 2.0))
    assert [p.name for p in _names(tmp_path, "*")] == ["ckpt.pt"]


def test_storage_view_is_zero_copy() -> None:
    from aiostage._persist._writer import storage_view

    t = torch.zeros(16, dtype=torch.uint8)
    view = storage_view(t.untyped_storage())
    t[3] = 200  # a later change to the tensor shows through: no copy was made
    assert bytes(view[3:4]) == bytes([200]) and view.nbytes == 16
    assert view.readonly is False


def test_zip64_chosen_automatically_past_4_gib() -> None:
    from aiostage._persist import _archive

    small = torch.zeros(1).untyped_storage()
    huge = _archive.StorageRecord("0", small, nbytes=5 * 1024**3)
    after = _archive.StorageRecord("1", small, nbytes=4)
    plan = _archive.plan_archive(b"pickle", [huge, after])
    assert [r.zip64 for r in plan.head_records] == [False] * 4
    assert huge.zip64  # its size does not fit 32 bits
    assert after.zip64  # its offset does not fit 32 bits
    assert all(r.zip64 for r in plan.tail_records)
    tail = plan.tail_bytes()
    assert b"PK\x06\x06" in tail and b"PK\x06\x07" in tail
    assert tail.endswith(b"\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00")  # sizes moved to zip64
