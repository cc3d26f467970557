"""aiostage.load's parallel record reader: same result as torch.load, batching, faults."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import stat
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from _compare import assert_same, write
from _frees import watch_frees
from _reads import count_thread_steps, small_read_batches
from _states import mixed_state

import aiostage
from aiostage import CheckpointLoadError, CorruptCheckpointError
from aiostage._load import _reader, _records
from aiostage._persist import _archive, _index


@pytest.mark.parametrize("writer", ["aiostage", "torch.save"])
async def test_same_result_as_torch_load(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = mixed_state()
    path = await write(writer, state, tmp_path / "ckpt.pt")
    want = torch.load(path, weights_only=True)

    def no_fallback(*args: object) -> None:
        raise AssertionError("fell back to torch.load")

    monkeypatch.setattr(_reader, "_torch_load", no_fallback)
    got = await aiostage.load(path)
    assert_same(got, want)
    views = got["views"]
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()
    assert isinstance(got["model"]["param"], torch.nn.Parameter)


async def test_small_batches_cut_and_coalesce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records larger than a batch are cut into chunks, small neighbours share
    one preadv call; the bytes still land where they belong."""
    state = {"big": torch.randn(100_000), "small": [torch.randn(7) for _ in range(50)]}
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    calls: list[int] = []
    real = _records.read_batch

    def counting(path: str, fd: int, batch: _records.ReadBatch, *direct: object) -> None:
        calls.append(len(batch.parts))
        real(path, fd, batch, *direct)  # type: ignore[arg-type]

    monkeypatch.setattr(_records, "read_batch", counting)
    small_read_batches(monkeypatch, 64 * 1024)
    got = await aiostage.load(path)
    assert_same(got, state)
    assert len(calls) < 51 + 400_000 // (64 * 1024) + 1  # the 50 small ones were coalesced
    assert max(calls) > 2  # at least one call read several records (with gaps between)
    assert sum(1 for c in calls if c == 1) >= 400_000 // (64 * 1024)  # the big one, in chunks


def test_plan_reads_covers_each_record_once(tmp_path: Path) -> None:
    state = {f"t{i}": torch.randn(i * 37 + 1) for i in range(40)}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    entries = _reader._open_archive(str(path))
    prefix = _records.archive_prefix(entries)
    storages, batches = _records.plan_reads(entries, prefix, batch_bytes=1000)
    covered: dict[int, int] = {}
    for batch in batches:
        assert sum(stop - lo for _, lo, stop in batch.parts) == batch.nbytes
        assert batch.nbytes <= 1000
        for storage, lo, stop in batch.parts:
            if storage is not None:
                covered[id(storage)] = covered.get(id(storage), 0) + stop - lo
    assert covered == {id(s): s.nbytes() for s in storages.values() if s.nbytes()}


def first_batch(path: Path) -> _records.ReadBatch:
    entries = _reader._open_archive(str(path))
    return _records.plan_reads(entries, _records.archive_prefix(entries))[1][0]


def read_from(opened: Path, path: Path, batch: _records.ReadBatch) -> None:
    """``read_batch`` for ``path``, through a descriptor of ``opened``."""
    fd = os.open(opened, os.O_RDONLY)
    try:
        _records.read_batch(str(path), fd, batch)
    finally:
        os.close(fd)


async def test_file_truncated_after_open_is_corrupt(tmp_path: Path) -> None:
    path = await aiostage.persist({"w": torch.randn(50_000)}, tmp_path / "ckpt.pt")
    batch = first_batch(path)
    os.truncate(path, batch.offset + 100)
    with pytest.raises(CorruptCheckpointError, match="truncated") as info:
        read_from(path, path, batch)
    assert str(path) in str(info.value)


async def test_read_error_names_file_and_errno(tmp_path: Path) -> None:
    path = await aiostage.persist({"w": torch.randn(1000)}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointLoadError, match="errno") as info:
        read_from(tmp_path, path, first_batch(path))  # a directory: EISDIR
    assert str(path) in str(info.value)


def write_zip(path: Path, records: dict[str, bytes]) -> Path:
    """A stored zip of ``records`` with plain attributes (as torch.save writes)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o600) << 16
            zf.writestr(info, data)
    return path


async def test_record_size_mismatch_is_corrupt(tmp_path: Path) -> None:
    """data.pkl promising more elements than the record holds is refused,
    naming the record (torch.load would read past it)."""
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.randn(10)}, path)
    with zipfile.ZipFile(path) as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    data_name = next(n for n in records if n.endswith("/data/0"))
    records[data_name] = records[data_name][:20]  # 5 floats instead of 10
    broken = write_zip(tmp_path / "broken.pt", records)
    with pytest.raises(CorruptCheckpointError, match=r"data\.pkl expects 40") as info:
        await aiostage.load(broken)
    assert "data/0" in str(info.value)


@pytest.mark.skipif(sys.byteorder != "little", reason="builds a big-endian archive by hand")
async def test_big_endian_archive_goes_through_torch_load(tmp_path: Path) -> None:
    """An archive marked big-endian is byte-swapped by torch.load (the
    parallel path only reads native-order archives)."""
    want = torch.arange(12, dtype=torch.float32)
    path = tmp_path / "le.pt"
    torch.save({"w": want}, path)
    with zipfile.ZipFile(path) as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    for name in records:
        if name.endswith("/byteorder"):
            records[name] = b"big"
        if name.endswith("/data/0"):
            le = records[name]
            records[name] = b"".join(le[i : i + 4][::-1] for i in range(0, len(le), 4))
    big = write_zip(tmp_path / "be.pt", records)
    got = await aiostage.load(big)
    assert torch.equal(got["w"], want)


async def test_cancel_stops_readers_between_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while reading: no reader thread is left running (each
    in-flight batch is waited for) and no further batch starts."""
    path = await aiostage.persist({"w": torch.randn(1_000_000)}, tmp_path / "ckpt.pt")
    small_read_batches(monkeypatch, 64 * 1024)
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()
    lock = threading.Lock()
    stats = {"in_flight": 0, "started": 0, "max_after_return": 0}
    real_read = _records.read_batch

    def slow_read(path: str, fd: int, batch: _records.ReadBatch, *direct: object) -> None:
        with lock:
            stats["in_flight"] += 1
            stats["started"] += 1
        loop.call_soon_threadsafe(started.set)
        release.wait(timeout=30)
        real_read(path, fd, batch, *direct)  # type: ignore[arg-type]
        with lock:
            stats["in_flight"] -= 1

    monkeypatch.setattr(_records, "read_batch", slow_read)
    task = asyncio.create_task(aiostage.load(path))
    await started.wait()
    task.cancel()
    loop.call_soon(release.set)  # let the in-flight batches finish after the cancel
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stats["in_flight"] == 0
    threads = max(_reader.READ_THREADS, _reader.COLD_READ_THREADS)
    assert stats["started"] <= threads  # 62 batches in all; none began after


async def test_each_reader_reads_all_its_batches_in_one_thread_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readers do not hand back to the event loop between batches (a
    hop per batch drew a reader onto the loop's core, see READ_THREADS):
    a load's worker-thread steps do not grow with its batches."""
    want = torch.randn(1_000_000)
    path = await aiostage.persist({"w": want}, tmp_path / "ckpt.pt")
    small_read_batches(monkeypatch, 64 * 1024)
    read = [0]
    real_read = _records.read_batch

    def counted(path: str, fd: int, batch: _records.ReadBatch, *direct: object) -> None:
        read[0] += 1
        real_read(path, fd, batch, *direct)  # type: ignore[arg-type]

    monkeypatch.setattr(_records, "read_batch", counted)
    steps = count_thread_steps(monkeypatch)
    got = await aiostage.load(path)
    assert torch.equal(got["w"], want)
    assert read[0] == -(-4_000_000 // (64 * 1024))  # 62 batches
    assert steps[0] <= 12  # opening and planning, the unpickler, one per reader


async def test_mmap_load_slices_one_mapping_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mmap=True maps the file once and rebuilds the state on slices of it
    (no bytes read up front), with torch.load's result."""
    state = mixed_state()
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    want = torch.load(path, weights_only=True)

    def no_fallback(*args: object) -> None:
        raise AssertionError("fell back to torch.load")

    monkeypatch.setattr(_reader, "_torch_load", no_fallback)
    got = await aiostage.load(path, mmap=True)
    assert_same(got, want)
    offsets = {e.name: e.data_offset for e in _reader._open_archive(str(path))}
    records = [n for n in offsets if "/data/" in n]
    w, b = got["model"]["w"], got["model"]["b"]
    # Both storages lie in one mapping, as far apart as their records are.
    ptr_gap = b.untyped_storage().data_ptr() - w.untyped_storage().data_ptr()
    assert ptr_gap in {offsets[x] - offsets[y] for x in records for y in records if x != y}


def rebuilt_by(monkeypatch: pytest.MonkeyPatch, rebuild: str) -> tuple[Any, str]:
    """Where the state will be rebuilt from, as (module, function name): the
    state index, or (writes from now on get no index) the pickle."""
    if rebuild == "index":
        return _index, "decode"
    monkeypatch.setattr(_index, "encode", lambda *args: None)
    return _records, "unpickle"


@pytest.mark.parametrize("rebuild", ["index", "pickle"])
async def test_the_state_is_rebuilt_while_the_records_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuild: str
) -> None:
    """A read waits for the rebuilding (unpickling, or decoding the state
    index) to have begun: were the two steps in sequence (reads first), the
    read would time out and the load fail."""
    module, name = rebuilt_by(monkeypatch, rebuild)
    sd = {f"t{i}": torch.full((64,), float(i)) for i in range(50)}
    path = await aiostage.persist(sd, tmp_path / "ckpt.pt")
    unpickling = threading.Event()
    overlapped: list[bool] = []
    real_read, real_unpickle = _records.read_batch, getattr(module, name)

    def read_batch(*args: Any) -> None:
        overlapped.append(unpickling.wait(timeout=10))
        real_read(*args)

    def unpickle(*args: Any) -> Any:
        unpickling.set()
        return real_unpickle(*args)

    monkeypatch.setattr(_records, "read_batch", read_batch)
    monkeypatch.setattr(module, name, unpickle)
    loaded = await aiostage.load(path)
    assert overlapped and all(overlapped)
    assert_same(loaded, sd)


@pytest.mark.parametrize("rebuild", ["index", "pickle"])
async def test_an_error_rebuilding_the_state_stops_the_reads_and_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuild: str
) -> None:
    module, name = rebuilt_by(monkeypatch, rebuild)
    path = await aiostage.persist({"w": torch.randn(1_000_000)}, tmp_path / "ckpt.pt")
    small_read_batches(monkeypatch, 64 * 1024)
    failed = threading.Event()
    batches_after: list[bool] = []
    real_read = _records.read_batch

    def read_batch(*args: Any) -> None:
        batches_after.append(failed.is_set())
        real_read(*args)

    def unpickle(*args: Any) -> Any:
        failed.set()
        raise CorruptCheckpointError("simulated bad pickle", path=str(path))

    monkeypatch.setattr(_records, "read_batch", read_batch)
    monkeypatch.setattr(module, name, unpickle)
    with pytest.raises(CorruptCheckpointError, match="simulated bad pickle"):
        await aiostage.load(path)
    # Reads stop soon after the failure: at most the batches then in flight.
    assert batches_after.count(True) <= _reader.READ_THREADS
    assert len(batches_after) < 62


@pytest.mark.parametrize("rebuild", ["index", "pickle"])
@pytest.mark.parametrize("mode", ["plain", "into", "mmap"])
async def test_a_load_indexes_off_the_loop_and_rebuilds_with_the_collector_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, rebuild: str
) -> None:
    """Unpickling tens of thousands of tensors made three full collections
    of about 0.1 s each on the loop's thread, one load; paused, none (and
    the same for decoding the state index).  Indexing the archive's records
    by name and key took 9-10 ms for 20,000 records in one step of the
    loop; it runs in a worker thread."""
    module, name = rebuilt_by(monkeypatch, rebuild)
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(10)}
    path = await aiostage.persist(sd, tmp_path / "ckpt.pt")
    enabled: list[bool] = []
    threads: list[int] = []
    real_unpickle, real_index = getattr(module, name), _records.index_entries

    def unpickle(*args: Any) -> Any:
        enabled.append(gc.isenabled())
        return real_unpickle(*args)

    def index_entries(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real_index(*args)

    monkeypatch.setattr(module, name, unpickle)
    monkeypatch.setattr(_records, "index_entries", index_entries)
    assert gc.isenabled()
    if mode == "plain":
        loaded = await aiostage.load(path)
    elif mode == "mmap":
        loaded = await aiostage.load(path, mmap=True)
    else:
        into = {k: torch.zeros(4) for k in sd}
        loaded = await aiostage.load(path, into=into)
    assert enabled == [False]
    assert gc.isenabled()  # and on again afterwards
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert_same(loaded, sd)


@pytest.mark.parametrize("mode", ["plain", "into", "mmap"])
async def test_a_loads_objects_per_record_are_freed_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A load holds an object or more per record in lists and dicts (the
    entries, the index by name and by key, the reads); freed when load()
    returned, those of 20,000 records held the loop 5-10 ms.  A worker
    thread empties them first, a block at a time."""
    count = 300
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(count)}
    path = await aiostage.persist(sd, tmp_path / "ckpt.pt")
    freed = watch_frees(monkeypatch, _reader)
    if mode == "plain":
        loaded = await aiostage.load(path)
    elif mode == "mmap":
        loaded = await aiostage.load(path, mmap=True)
    else:
        loaded = await aiostage.load(path, into={k: torch.zeros(4) for k in sd})
    assert_same(loaded, sd)
    assert len(freed) == 1
    on_loop, sizes = freed[0]
    assert not on_loop
    assert sizes >= 4 * count  # the entries, both indexes and the sizes, at least


def test_the_unpicklers_memo_and_storage_wrappers_are_freed_a_block_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memo holds every object the pickle built (5 ms to free in one
    call for 20,000 tensors, at the end of the worker's step): it is
    emptied a block at a time, with the wrappers, before unpickle returns."""
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(500)}
    pickled, records, _ = _archive.pickle_state(sd)
    storages = {r.key: r.storage for r in records}
    emptied: list[int] = []
    real = _records.free_all_in_blocks

    def spy(*containers: Any) -> None:
        emptied.extend(len(c) for c in containers)
        real(*containers)

    monkeypatch.setattr(_records, "free_all_in_blocks", spy)
    loaded = _records.unpickle(
        "ckpt.pt", pickled, lambda key, nbytes: storages[key], contextlib.nullcontext
    )
    assert torch.equal(loaded["t499"], sd["t499"])
    assert len(emptied) == 2
    assert emptied[0] == 500  # a wrapper per storage
    assert emptied[1] >= 3 * 500  # the memo: the tensor, its sizes, its strides, ...


def test_listing_the_records_frees_the_directory_a_block_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(200)}
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    emptied: list[int] = []
    real = _reader.free_in_blocks

    def spy(items: list[Any], turn: Any = None) -> None:
        emptied.append(len(items))
        real(items, turn)

    monkeypatch.setattr(_reader, "free_in_blocks", spy)
    entries = _reader._open_archive(str(path))
    assert emptied == [len(entries)]  # the directory's entry per record
    assert len(entries) > 200


def test_indexing_turns_the_gil_over_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the index of 20,000 records took 9-10 ms holding the GIL
    (a 5 ms wait for the loop, the switch interval); it offers the GIL
    every record."""
    entries = [_reader._Entry("archive/data.pkl", 0, 1, 0)]
    entries += [_reader._Entry(f"archive/data/{i}", 0, 4, 0) for i in range(1000)]
    turns: list[int] = []
    monkeypatch.setattr(_records.GilTurns, "__call__", lambda self: turns.append(1))
    prefix, by_name, records, sizes = _records.index_entries(entries)
    assert prefix == "archive/" and len(by_name) == 1001 and len(records) == len(sizes) == 1000
    assert len(turns) >= 3 * 1000  # by name, the storage records, their sizes


def test_an_archive_without_a_pickle_is_not_indexed() -> None:
    with pytest.raises(_records.Unsupported, match=r"no top-level data\.pkl"):
        _records.index_entries([])
