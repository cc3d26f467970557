"""aiostage.load: verification, bad files, safety (weights_only + safe_globals)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from _reads import count_thread_steps

import aiostage
from aiostage import CheckpointLoadError, CorruptCheckpointError, UnsafeCheckpointError
from aiostage._load import _reader
from aiostage._persist import _index


@dataclasses.dataclass
class RunInfo:
    step: int
    lr: float


def record_data_offset(path: Path, name: str) -> int:
    """Where a record's bytes start: central-directory offset + local header lengths."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def storage_record(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith("/data/0"))


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


async def test_verify_catches_a_flipped_storage_byte(tmp_path: Path) -> None:
    state = {"w": torch.arange(100_000, dtype=torch.float32)}
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    await aiostage.load(path, verify=True)  # intact: passes
    record = storage_record(path)
    flip_byte(path, record_data_offset(path, record) + 4 * 1234 + 2)

    with pytest.raises(CorruptCheckpointError) as info:
        await aiostage.load(path, verify=True)
    assert info.value.record == record
    assert record in str(info.value) and str(path) in str(info.value)
    assert "CRC" in str(info.value)

    # Without verify the flip goes unnoticed: load does not read-check everything.
    loaded = await aiostage.load(path)
    assert not torch.equal(loaded["w"], state["w"])
    assert (loaded["w"] != state["w"]).sum().item() == 1


async def test_verify_on_torch_save_file_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    state = {"a": torch.randn(300_000), "b": [torch.ones(3, dtype=torch.int8)]}
    torch.save(state, path)
    calls: list[tuple[int, int]] = []
    old = _reader.VERIFY_CHUNK_BYTES
    _reader.VERIFY_CHUNK_BYTES = 256 * 1024
    try:
        loaded = await aiostage.load(path, verify=True, progress=lambda d, t: calls.append((d, t)))
    finally:
        _reader.VERIFY_CHUNK_BYTES = old
    assert torch.equal(loaded["a"], state["a"])
    assert torch.equal(loaded["b"][0], state["b"][0])
    total = calls[-1][1]
    assert calls[-1] == (total, total) and total >= 1_200_000
    assert len(calls) > 4 and [d for d, _ in calls] == sorted(d for d, _ in calls)


async def test_verify_reads_in_one_thread_step_and_stops_on_a_progress_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification does not hop back to the event loop per chunk (see
    READ_THREADS); progress still comes on the loop thread, after each chunk,
    and an error it raises stops the check and is raised."""
    path = await aiostage.persist({"w": torch.randn(1_000_000)}, tmp_path / "ckpt.pt")
    monkeypatch.setattr(_reader, "VERIFY_CHUNK_BYTES", 64 * 1024)
    steps = count_thread_steps(monkeypatch)
    loop_thread = threading.get_ident()
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        assert threading.get_ident() == loop_thread
        calls.append(done)

    await aiostage.load(path, verify=True, progress=progress)
    assert len(calls) > 62  # a call per 64 KiB chunk of the 4 MB record, and the last
    assert steps[0] <= 10  # not one per chunk

    def fails_at_third(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            raise KeyError("stop here")

    calls.clear()
    with pytest.raises(KeyError, match="stop here"):
        await aiostage.load(path, verify=True, progress=fails_at_third)
    assert len(calls) == 3  # no progress after the error


def test_verify_reads_a_group_of_records_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small records in file order are read a group at a time (one
    sequential read); out of order, one by one; either way every CRC is
    checked.  A file cut inside a group names the first record cut."""
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(6)}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    entries = _reader._open_archive(str(path))
    reads: list[int] = []
    real_preadv = os.preadv

    def counted(fd: int, buffers: Any, offset: int, *flags: int) -> int:
        reads.append(offset)
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", counted)
    _reader._verify_all(threading.Event(), str(path), entries, lambda done, stop: True)
    assert len(reads) == 1
    reads.clear()
    _reader._verify_all(threading.Event(), str(path), entries[::-1], lambda done, stop: True)
    assert len(reads) == len(entries)

    records = [e for e in entries if "/data/" in e.name]
    cut = records[3]
    with path.open("r+b") as f:
        f.truncate(cut.data_offset + 10)
    with pytest.raises(CorruptCheckpointError, match="truncated") as info:
        _reader._verify_all(threading.Event(), str(path), entries, lambda done, stop: True)
    assert info.value.record == cut.name


async def test_torch_save_file_loads_with_mmap(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    base = torch.randn(64)
    torch.save({"base": base, "view": base[8:16]}, path)
    loaded = await aiostage.load(path, mmap=True)
    assert torch.equal(loaded["view"], base[8:16])
    assert loaded["view"].untyped_storage().data_ptr() == (
        loaded["base"].untyped_storage().data_ptr()
    )


async def test_dataclass_needs_safe_globals(tmp_path: Path) -> None:
    state = {"info": RunInfo(step=3, lr=0.1), "w": torch.ones(2)}
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        await aiostage.load(path)
    message = str(info.value)
    assert "safe_globals" in message and str(path) in message
    assert "RunInfo" in message
    before = torch.serialization.get_safe_globals()
    loaded = await aiostage.load(path, safe_globals=[RunInfo])
    assert loaded["info"] == RunInfo(step=3, lr=0.1)
    # The allow-list is for that load only.
    assert set(torch.serialization.get_safe_globals()) == set(before)
    with pytest.raises(UnsafeCheckpointError):
        await aiostage.load(path)


async def test_callers_own_safe_globals_survive(tmp_path: Path) -> None:
    path = await aiostage.persist({"info": RunInfo(1, 2.0)}, tmp_path / "ckpt.pt")
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([RunInfo])
    try:
        await aiostage.load(path, safe_globals=[RunInfo])
        assert RunInfo in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


async def test_code_execution_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": print}, path)  # a global that must never be resolved
    with pytest.raises(UnsafeCheckpointError, match="safe_globals"):
        await aiostage.load(path)


async def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointLoadError, match="not found") as info:
        await aiostage.load(path)
    assert info.value.path == str(path)
    assert not isinstance(info.value, CorruptCheckpointError)


async def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointLoadError, match="not a regular file"):
        await aiostage.load(tmp_path)


async def test_non_zip_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 100)
    with pytest.raises(CorruptCheckpointError, match=r"not a torch\.save zip") as info:
        await aiostage.load(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
async def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = await aiostage.persist({"w": torch.randn(50_000)}, tmp_path / "ckpt.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError) as info:
        await aiostage.load(path)
    assert str(path) in str(info.value)


async def test_record_past_end_of_file_is_named(tmp_path: Path) -> None:
    """A file cut inside a storage, with a copied-back directory, names the record."""
    path = await aiostage.persist({"w": torch.randn(50_000)}, tmp_path / "ckpt.pt")
    data = path.read_bytes()
    record = storage_record(path)
    start = record_data_offset(path, record)
    with zipfile.ZipFile(path) as zf:
        cd_offset = zf.start_dir
    # Drop the second half of the storage's bytes and everything after it up
    # to the directory, then fix the end record's directory offset: the
    # directory is consistent but the record runs past the end of the file.
    cut = start + 100_000
    tail = bytearray(data[cd_offset:])
    tail[-22 + 16 : -22 + 20] = cut.to_bytes(4, "little")
    path.write_bytes(data[:cut] + bytes(tail))
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo(record).header_offset < cut  # zipfile itself still parses it
    with pytest.raises(CorruptCheckpointError, match="past the end") as info:
        await aiostage.load(path, verify=True)
    assert info.value.record == record
    assert str(path) in str(info.value)


async def test_inconsistent_directory_offsets(tmp_path: Path) -> None:
    path = await aiostage.persist({"w": torch.randn(50_000)}, tmp_path / "ckpt.pt")
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        cd_offset = zf.start_dir
    path.write_bytes(data[:1000] + data[cd_offset:])  # end record not patched
    with pytest.raises(CorruptCheckpointError) as info:
        await aiostage.load(path)
    assert str(path) in str(info.value)


async def test_cancel_during_verify(tmp_path: Path) -> None:
    path = await aiostage.persist({"w": torch.randn(4_000_000)}, tmp_path / "ckpt.pt")
    first = anyio.Event()
    old = _reader.VERIFY_CHUNK_BYTES
    _reader.VERIFY_CHUNK_BYTES = 256 * 1024
    try:
        task = asyncio.create_task(
            aiostage.load(path, verify=True, progress=lambda d, t: first.set())
        )
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        _reader.VERIFY_CHUNK_BYTES = old


async def test_no_progress_after_a_verify_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk that finishes after the cancellation reports no progress
    (the small records before the large one report first).  The first
    chunk's read asks for the cancellation and waits until it is delivered.
    (The cancellation came from the small records' progress call before:
    a thread slow to reach the chunk then saw the stop first and read
    nothing.)"""
    path = await aiostage.persist({"w": torch.randn(1_000_000)}, tmp_path / "ckpt.pt")
    monkeypatch.setattr(_reader, "VERIFY_CHUNK_BYTES", 64 * 1024)
    loop = asyncio.get_running_loop()
    release = threading.Event()
    reads = [0]
    real_read = _reader._read_exactly

    def cancel() -> None:
        task.cancel()
        loop.call_soon(release.set)  # after the cancellation is delivered

    def gated(*args: Any) -> None:
        reads[0] += 1
        if reads[0] == 1:  # the first chunk of the record waits for the cancellation
            loop.call_soon_threadsafe(cancel)
            release.wait(timeout=30)
        real_read(*args)

    monkeypatch.setattr(_reader, "_read_exactly", gated)
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)

    task = asyncio.create_task(aiostage.load(path, verify=True, progress=progress))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reads[0] == 1  # that chunk was read, then the check stopped
    assert len(calls) == 1  # (the small records before it); none for the chunk


def central_header_offset(raw: bytes, name: str) -> int:
    """Where the central-directory entry of record ``name`` starts."""
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = int.from_bytes(raw[pos + 28 : pos + 30], "little")
        if raw[pos + 46 : pos + 46 + name_len] == name.encode():
            return pos
        pos = raw.find(b"PK\x01\x02", pos + 1)
    raise AssertionError(f"no central entry for {name}")


def patch(path: Path, offset: int, value: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(value)


async def write_with(writer: str, state: object, path: Path) -> Path:
    if writer == "aiostage":
        return await aiostage.persist(state, path)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("writer", ["aiostage", "torch"])
async def test_directory_bit_in_central_directory_is_rejected(tmp_path: Path, writer: str) -> None:
    """torch reads a record whose MS-DOS directory bit is set as a directory and
    hands back uninitialised memory; the CRCs alone do not notice."""
    state = {"a": torch.arange(100, dtype=torch.float32)}
    path = await write_with(writer, state, tmp_path / "ckpt.pt")
    raw = path.read_bytes()
    record = storage_record(path)
    attr = central_header_offset(raw, record) + 38  # external attributes, low byte
    patch(path, attr, bytes([raw[attr] | 0x10]))
    with pytest.raises(CorruptCheckpointError, match="directory") as info:
        await aiostage.load(path, verify=True)
    assert info.value.record == record and str(path) in str(info.value)


@pytest.mark.parametrize("writer", ["aiostage", "torch"])
async def test_compression_method_flip_is_corruption(tmp_path: Path, writer: str) -> None:
    path = await write_with(writer, {"a": torch.ones(10)}, tmp_path / "ckpt.pt")
    raw = path.read_bytes()
    record = storage_record(path)
    patch(path, central_header_offset(raw, record) + 10, (8).to_bytes(2, "little"))  # deflate
    with pytest.raises(CorruptCheckpointError, match="compression method 8") as info:
        await aiostage.load(path, verify=True)
    assert info.value.record == record


@pytest.mark.parametrize("writer", ["aiostage", "torch"])
@pytest.mark.parametrize(
    ("field", "offset", "value", "message"),
    [
        ("flags", 8, 0x0001, "flag bits"),  # encrypted
        ("external attributes", 38, 0o040755 << 16, "not a file"),  # a Unix directory
        ("stored size", 20, 1, "size"),
    ],
)
async def test_unexpected_central_fields_are_rejected(
    tmp_path: Path, writer: str, field: str, offset: int, value: int, message: str
) -> None:
    path = await write_with(writer, {"a": torch.ones(10)}, tmp_path / "ckpt.pt")
    raw = path.read_bytes()
    record = storage_record(path)
    width = 2 if offset == 8 else 4
    patch(path, central_header_offset(raw, record) + offset, value.to_bytes(width, "little"))
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        await aiostage.load(path, verify=True)
    assert info.value.record == record, field


async def test_local_header_must_agree_with_central_directory(tmp_path: Path) -> None:
    path = await aiostage.persist({"a": torch.ones(10), "b": torch.zeros(10)}, tmp_path / "c.pt")
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        first = zf.getinfo("archive/data/0")
        second = zf.getinfo("archive/data/1")
    # The directory's CRC of record 0 changed: its local header disagrees.
    bad = tmp_path / "crc.pt"
    bad.write_bytes(raw)
    patch(
        bad, central_header_offset(raw, first.filename) + 16, (first.CRC ^ 1).to_bytes(4, "little")
    )
    with pytest.raises(CorruptCheckpointError, match="CRC-32 differs") as info:
        await aiostage.load(bad, verify=True)
    assert info.value.record == first.filename
    # The directory entry of record 1 points at record 0's local header.
    bad = tmp_path / "name.pt"
    bad.write_bytes(raw)
    patch(
        bad,
        central_header_offset(raw, second.filename) + 42,
        first.header_offset.to_bytes(4, "little"),
    )
    with pytest.raises(CorruptCheckpointError, match="names another record") as info:
        await aiostage.load(bad, verify=True)
    assert info.value.record == second.filename


async def test_torch_save_data_descriptor_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(10)}, path)
    raw = path.read_bytes()
    record = storage_record(path)
    end = record_data_offset(path, record) + 40
    assert raw[end : end + 4] == b"PK\x07\x08"
    patch(path, end + 8, (41).to_bytes(4, "little"))  # the descriptor's stored size
    with pytest.raises(CorruptCheckpointError, match="descriptor") as info:
        await aiostage.load(path, verify=True)
    assert info.value.record == record


def pickle_record(path: Path) -> tuple[int, int]:
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
    return record_data_offset(path, info.filename), info.file_size


@pytest.mark.parametrize("writer", ["aiostage", "torch"])
async def test_corrupt_pickle_without_verify_is_not_called_unsafe(
    tmp_path: Path, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch says "Weights only load failed" for every unpickler error; only a
    refused global is unsafe, an unknown opcode is corruption.  (aiostage's
    file without its state index, so that the pickle is what is read.)"""
    monkeypatch.setattr(_index, "encode", lambda *args: None)
    path = await write_with(writer, {"a": torch.ones(3)}, tmp_path / "ckpt.pt")
    start, size = pickle_record(path)
    assert path.read_bytes()[start + size - 1 : start + size] == b"."  # STOP
    patch(path, start + size - 1, b"\xff")  # an opcode no unpickler knows
    with pytest.raises(CorruptCheckpointError, match=r"data\.pkl") as info:
        await aiostage.load(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "safe_globals" not in str(info.value)


async def test_blocked_module_is_unsafe_without_allow_list_advice(tmp_path: Path) -> None:
    import os

    path = tmp_path / "evil.pt"
    torch.save({"x": os.system}, path)
    with pytest.raises(UnsafeCheckpointError, match="never allows module") as info:
        await aiostage.load(path)
    assert "safe_globals" not in str(info.value)


async def test_async_progress_is_rejected(tmp_path: Path) -> None:
    path = await aiostage.persist({"a": torch.ones(3)}, tmp_path / "ckpt.pt")

    async def progress(done: int, total: int) -> None:
        pass

    with pytest.raises(TypeError, match="progress"):
        await aiostage.load(path, progress=progress)  # type: ignore[arg-type]


async def test_verify_checks_many_small_records_per_thread_hop(tmp_path: Path) -> None:
    """3,000 tiny storages are verified in a few worker-thread steps, not one
    each; a flip in one of them is still named."""
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(3000)}
    path = await aiostage.persist(state, tmp_path / "many.pt")
    calls: list[tuple[int, int]] = []
    loaded = await aiostage.load(path, verify=True, progress=lambda d, t: calls.append((d, t)))
    assert torch.equal(loaded["t2999"], state["t2999"])
    assert 2 <= len(calls) <= 3000 // _reader._VERIFY_MAX_RECORDS + 3
    assert calls[-1][0] == calls[-1][1]
    with zipfile.ZipFile(path) as zf:
        record = next(n for n in zf.namelist() if n.endswith("/data/2500"))
    flip_byte(path, record_data_offset(path, record) + 3)
    with pytest.raises(CorruptCheckpointError, match="CRC") as info:
        await aiostage.load(path, verify=True)
    assert info.value.record == record
