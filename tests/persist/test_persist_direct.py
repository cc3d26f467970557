"""Direct I/O: large storages bypass the page cache, byte-exact, with fallbacks."""

from __future__ import annotations

import ctypes
import os
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from _pagecache import needs_direct, resident_fraction

import aiostage
from aiostage._persist import _archive, _atomic, _writer
from aiostage._persist._writer import DIRECT_IO_ENV, DIRECT_MIN_BYTES, persist

MiB = 1024 * 1024


def odd_state() -> dict[str, torch.Tensor]:
    """Large storages of sizes that are not multiples of a page, a view that
    starts inside its storage, and small storages between them."""
    base = torch.arange(3 * MiB // 4 + 17, dtype=torch.float32)
    return {
        "exact": torch.arange(MiB // 4, dtype=torch.float32),
        "small": torch.arange(100, dtype=torch.int64),
        "odd": torch.arange(MiB + 4095, dtype=torch.uint8),
        "view": base[1000:],
        "base": base,
        "tiny": torch.tensor([1.5, 2.5]),
        "bf16": torch.randn(5 * MiB // 2 - 32).to(torch.bfloat16),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_large_aligned_storages_are_placed_for_direct_writes() -> None:
    state = odd_state()
    pickled, storages, _ = _archive.pickle_state(state)
    plan = _archive.plan_archive(pickled, storages, direct_min=DIRECT_MIN_BYTES)
    direct = {s.key for s in plan.storages if s.direct}
    assert direct == {s.key for s in plan.storages if s.nbytes >= DIRECT_MIN_BYTES}
    assert len(direct) == 4  # exact, odd, base (shared with view), bf16
    for s in plan.storages:
        assert s.data_offset % _archive.ALIGNMENT == 0
        if s.direct:
            assert s.data_offset % _archive.DIRECT_ALIGN == s.storage.data_ptr() % 4096
    plain = _archive.plan_archive(*_archive.pickle_state(state))
    assert not any(s.direct for s in plain.storages)


def test_misaligned_memory_is_not_placed_for_direct_writes() -> None:
    buffer = bytearray(2 * MiB + 64)
    skew = (1 - ctypes.addressof(ctypes.c_char.from_buffer(buffer))) % 64
    skewed = torch.frombuffer(memoryview(buffer)[skew:], dtype=torch.uint8)
    assert skewed.untyped_storage().data_ptr() % 64 != 0
    aligned = torch.zeros(2 * MiB, dtype=torch.uint8)
    pickled, storages, _ = _archive.pickle_state({"skewed": skewed, "aligned": aligned})
    plan = _archive.plan_archive(pickled, storages, direct_min=DIRECT_MIN_BYTES)
    assert [s.direct for s in plan.storages] == [False, True]
    assert all(s.data_offset % _archive.ALIGNMENT == 0 for s in plan.storages)


@needs_direct
async def test_direct_persist_is_byte_exact_and_skips_the_page_cache(tmp_path: Path) -> None:
    state = odd_state()
    direct = tmp_path / "direct.pt"
    cached = tmp_path / "cached.pt"
    # Chunks that split records at offsets that are not block aligned.
    await persist(state, direct, _chunk_bytes=MiB + 100)
    await persist(state, cached, direct_io=False, _chunk_bytes=MiB + 100)

    # Only the headers, small records and partial blocks went through the cache.
    assert resident_fraction(direct) < 0.05
    assert resident_fraction(cached) > 0.95  # the control: a buffered write stays cached

    with zipfile.ZipFile(direct) as zf:
        assert zf.testzip() is None  # every CRC-32 matches
    assert_same(torch.load(direct, weights_only=True), state)
    assert_same(torch.load(direct, weights_only=True, mmap=True), state)
    assert_same(await aiostage.load(direct), state)
    loaded = await aiostage.load(direct)
    assert (
        loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    )


@needs_direct
async def test_environment_turns_direct_io_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"w": torch.randn(2 * MiB)}
    monkeypatch.setenv(DIRECT_IO_ENV, "0")
    await persist(state, tmp_path / "off.pt")
    assert resident_fraction(tmp_path / "off.pt") > 0.95
    # An explicit argument wins over the environment.
    await persist(state, tmp_path / "on.pt", direct_io=True)
    assert resident_fraction(tmp_path / "on.pt") < 0.05
    assert_same(await aiostage.load(tmp_path / "off.pt"), state)
    assert_same(await aiostage.load(tmp_path / "on.pt"), state)


async def test_bad_environment_value_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "c.pt"
    await persist({"old": torch.ones(2)}, target)
    monkeypatch.setenv(DIRECT_IO_ENV, "yes")
    with pytest.raises(ValueError, match=f"{DIRECT_IO_ENV} must be 0 or 1, not 'yes'"):
        await persist({"new": torch.ones(2)}, target)
    assert os.listdir(tmp_path) == ["c.pt"]
    assert list((await aiostage.load(target, direct_io=False)).keys()) == ["old"]


@needs_direct
def test_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path) -> None:
    """A storage that moved after planning makes the kernel refuse the
    O_DIRECT write (EINVAL: misaligned address); the bytes go through the
    page cache instead and the O_DIRECT descriptor is dropped."""
    tensor = torch.arange(3 * MiB, dtype=torch.uint8)
    pickled, storages, _ = _archive.pickle_state({"w": tensor})
    plan = _archive.plan_archive(pickled, storages, direct_min=DIRECT_MIN_BYTES)
    (rec,) = plan.storages
    assert rec.direct
    rec.data_offset += _archive.ALIGNMENT  # file offset and address now disagree
    temp = _writer._Temp()
    fd = temp.open(tmp_path / "c.pt", direct=True)
    try:
        assert temp.dfd is not None
        batch = [_writer._Piece(rec, 0, rec.nbytes)]
        _writer._write_batch(fd, temp, batch)
        assert temp.dfd is None
        assert temp.path is not None
        with open(temp.path, "rb") as f:
            f.seek(rec.data_offset)
            assert f.read(rec.nbytes) == tensor.numpy().tobytes()
    finally:
        temp.discard()
    assert os.listdir(tmp_path) == []


@needs_direct
async def test_with_direct_writes_the_writer_writes_the_local_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header written from the CRC thread waited for the writer's direct
    write in flight (ext4 holds the inode lock through an extending O_DIRECT
    write), so with direct writes the CRC thread leaves the headers to the
    writer, which writes each once, between its own writes or with the tail."""
    state = odd_state()
    writes: list[tuple[str, int, int]] = []
    real = _atomic.write_all

    def write_all(fd: int, data: bytes, offset: int) -> None:
        writes.append((threading.current_thread().name, offset, len(data)))
        real(fd, data, offset)

    monkeypatch.setattr(_atomic, "write_all", write_all)
    path = tmp_path / "direct.pt"
    await persist(state, path, _chunk_bytes=MiB + 100)
    pickled, storages, index = _archive.pickle_state(state)
    plan = _archive.plan_archive(pickled, storages, index, direct_min=DIRECT_MIN_BYTES)
    # Each header written once (a small record's with its bytes, in a run).
    for s in plan.storages:
        covering = [w for w in writes if w[1] <= s.header_offset < w[1] + w[2]]
        assert len(covering) == 1, s.name
    assert not any(name.startswith("aiostage-crc") for name, _, _ in writes)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every CRC-32 matches
    assert_same(await aiostage.load(path, verify=True), state)
