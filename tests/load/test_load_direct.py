"""Direct reads: a cold load reads large records past the page cache, a
cached one from the cache, byte-exact either way, with fallbacks."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from pathlib import Path

import pytest
import torch
from _pagecache import (
    evict,
    needs_cachestat,
    needs_direct,
    read_through_cache,
    resident_fraction,
)
from _reads import small_read_batches

import aiostage
from aiostage import CorruptCheckpointError
from aiostage._load import _reader, _records
from aiostage._memory import mapped_storage
from aiostage._persist._writer import DIRECT_IO_ENV, storage_view

MiB = 1024 * 1024

pytestmark = needs_direct


def big_state() -> dict[str, torch.Tensor]:
    """Large records of odd sizes (partial blocks at both ends), small ones between."""
    gen = torch.Generator().manual_seed(3)
    return {
        "a": torch.randn(MiB + 7, generator=gen),
        "small": torch.arange(100, dtype=torch.int64),
        "b": torch.randint(0, 255, (3 * MiB + 4095,), dtype=torch.uint8, generator=gen),
        "c": torch.randn(2 * MiB, generator=gen).to(torch.bfloat16),
    }


def blank_like(state: dict[str, torch.Tensor], skew: int = 0) -> dict[str, torch.Tensor]:
    """Zeroed tensors like ``state``'s, each starting as far into a 4 KiB
    page as the tensor of ``state`` (plus ``skew`` bytes): the writer placed
    each record in the file as its memory lay in the page, so with no skew
    direct reads apply.  (Where fresh storages land is up to the allocator,
    so the tests do not rely on it.)"""
    out = {}
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        raw = torch.zeros(nbytes + 8192, dtype=torch.uint8)
        skip = (tensor.data_ptr() + skew - raw.data_ptr()) % 4096
        skip -= skip % tensor.element_size()
        out[key] = raw[skip : skip + nbytes].view(tensor.dtype).view(tensor.shape)
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def cachestat_works(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _records.page_cache_state(fd, 0, 0) is not None
    finally:
        os.close(fd)


async def saved(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    state = big_state()
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    if not cachestat_works(path):
        pytest.skip("no cachestat (Linux 6.5+): loads read through the page cache")
    return state, path


async def test_cold_load_reads_past_the_page_cache(tmp_path: Path) -> None:
    state, path = await saved(tmp_path)
    evict(path)
    dest = blank_like(state)
    got = await aiostage.load(path, into=dest)
    assert_same(got, state)
    assert all(got[k] is dest[k] for k in state)
    # Not even the pieces read through the cache stay: a later read of the
    # whole file would find its readahead broken at each (see close()).
    assert resident_fraction(path) == 0
    # The control: the same load without direct reads fills the page cache.
    evict(path)
    assert_same(await aiostage.load(path, into=blank_like(state), direct_io=False), state)
    assert resident_fraction(path) > 0.95


async def test_plain_load_reads_through_the_page_cache(tmp_path: Path) -> None:
    """A plain load reads into fresh memory: through the page cache, into
    ordinary (resizable) storages, as torch.load does."""
    state, path = await saved(tmp_path)
    evict(path)
    got = await aiostage.load(path)
    assert_same(got, state)
    assert resident_fraction(path) > 0.95
    assert all(t.untyped_storage().resizable() for t in got.values())


async def test_cached_records_are_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file the page cache holds is read from it: no direct read at all."""
    state, path = await saved(tmp_path)
    read_through_cache(path)
    direct_reads: list[int] = []
    real_preadv = os.preadv

    def spying(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_reads.append(offset)
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", spying)
    assert_same(await aiostage.load(path, into=blank_like(state)), state)
    assert direct_reads == []
    # And the spy sees direct reads when the file is cold.
    evict(path)
    assert_same(await aiostage.load(path, into=blank_like(state)), state)
    assert len(direct_reads) >= 3


async def test_the_gaps_between_bounced_records_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large records whose memory does not line up with the file are read
    whole through a bounce buffer; the local headers and padding between
    them are not read at all.  (Each gap was a cold read through the page
    cache, waiting behind the direct reads in the device's queue: 250-290
    ms of one reader's time for 200 records of 5 MiB.)"""
    gen = torch.Generator().manual_seed(5)
    state = {f"t{i}": torch.randn(256 * 1024 + 3 * i, generator=gen) for i in range(6)}
    path = await aiostage.persist(state, tmp_path / "ckpt.pt")
    needs_cachestat(path)
    evict(path)
    reads: list[tuple[bool, int, int]] = []  # (direct, offset, bytes)
    real_preadv = os.preadv

    def spying(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        reads.append((direct, offset, sum(memoryview(b).nbytes for b in buffers)))
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", spying)
    assert_same(await aiostage.load(path, into=blank_like(state, skew=4)), state)
    entries = _reader._open_archive(str(path))
    records = _records.storage_records(entries, _records.archive_prefix(entries))
    assert len(records) == len(state)
    first = min(r.data_offset for r in records.values())  # (data.pkl and byteorder lie before)
    assert [r for r in reads if not r[0] and r[1] + r[2] > first] == []  # none through the cache
    for record in records.values():  # and every record read past it
        assert any(
            direct and at <= record.data_offset and record.data_offset + record.size <= at + n
            for direct, at, n in reads
        )


@pytest.mark.parametrize("skew", [4, 2048])
async def test_misaligned_destination_is_read_through_a_bounce_buffer(
    tmp_path: Path, skew: int
) -> None:
    """Destination memory that does not line up with the file is read with
    O_DIRECT into a bounce buffer and copied out, byte-exact."""
    state, path = await saved(tmp_path)
    evict(path)
    dest = blank_like(state, skew=skew)
    assert_same(await aiostage.load(path, into=dest), state)
    assert resident_fraction(path) < 0.05


async def test_bounce_buffer_is_smaller_than_a_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record larger than the bounce buffer goes through it in turns."""
    monkeypatch.setattr(_records, "BOUNCE_BYTES", 64 * 1024)
    state, path = await saved(tmp_path)
    evict(path)
    assert_same(await aiostage.load(path, into=blank_like(state, skew=4)), state)


async def test_refused_direct_read_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct read the kernel refuses (EINVAL: an offset and address aligned
    to 64 bytes only) makes the rest of the load go through the page cache."""
    state, path = await saved(tmp_path)
    evict(path)
    monkeypatch.setattr(_records, "DIRECT_ALIGN", 64)
    refused: list[bool] = []
    real_refuse = _records.DirectReads.refuse

    def spying(self: _records.DirectReads) -> None:
        refused.append(True)
        real_refuse(self)

    monkeypatch.setattr(_records.DirectReads, "refuse", spying)
    assert_same(await aiostage.load(path, into=blank_like(state)), state)
    assert refused  # the kernel did refuse one
    # What went through the cache stays there (a record read directly
    # before the refusal, by the other reader thread, may not be cached).
    assert resident_fraction(path) > 0


async def test_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, path = await saved(tmp_path)
    monkeypatch.setenv(DIRECT_IO_ENV, "0")
    evict(path)
    assert_same(await aiostage.load(path, into=blank_like(state)), state)
    assert resident_fraction(path) > 0.95
    evict(path)
    got = await aiostage.load(path, into=blank_like(state), direct_io=True)  # the argument wins
    assert_same(got, state)
    assert resident_fraction(path) < 0.05
    monkeypatch.setenv(DIRECT_IO_ENV, "yes")
    with pytest.raises(ValueError, match=f"{DIRECT_IO_ENV} must be 0 or 1, not 'yes'"):
        await aiostage.load(path)


@pytest.mark.parametrize("kind", ["direct", "bounced"])
async def test_truncated_file_is_corrupt_with_direct_reads(tmp_path: Path, kind: str) -> None:
    _, path = await saved(tmp_path)
    entries = _reader._open_archive(str(path))
    prefix = _records.archive_prefix(entries)
    skew = 0 if kind == "direct" else 4  # bytes off the file's alignment
    targets = {}
    for key, rec in _records.storage_records(entries, prefix).items():
        storage = torch.UntypedStorage(rec.size + 8192)
        targets[key] = (storage, (rec.data_offset + skew - storage.data_ptr()) % 4096)
    _, batches = _records.plan_reads(entries, prefix, targets=targets)
    batch = max(batches, key=lambda b: b.nbytes)
    os.truncate(path, batch.offset + batch.nbytes // 2 + 100)
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    direct = _records.DirectReads()
    try:
        direct.open(str(path), fd)
        assert direct.fd is not None
        assert kind in {span.kind for span in direct.spans(batch, views_of(batch))}
        with pytest.raises(CorruptCheckpointError, match="truncated") as info:
            _records.read_batch(str(path), fd, batch, direct)
    finally:
        direct.close()
        os.close(fd)
    assert str(path) in str(info.value)


def views_of(batch: _records.ReadBatch) -> list[memoryview]:
    return [
        memoryview(bytearray(stop)) if storage is None else storage_view(storage)[lo:stop]
        for storage, lo, stop in batch.parts
    ]


async def test_cancelled_cold_load_closes_its_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while its two readers are in direct reads, a load waits for
    them and closes both descriptors of the file."""
    state, path = await saved(tmp_path)
    evict(path)
    small_read_batches(monkeypatch, 1024 * 1024)
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()
    in_flight = [0]
    real_read = _records.read_batch

    def gated(path: str, fd: int, batch: _records.ReadBatch, *direct: object) -> None:
        in_flight[0] += 1
        loop.call_soon_threadsafe(started.set)
        release.wait(timeout=30)
        real_read(path, fd, batch, *direct)  # type: ignore[arg-type]
        in_flight[0] -= 1

    monkeypatch.setattr(_records, "read_batch", gated)
    before = set(os.listdir("/proc/self/fd"))
    task = asyncio.create_task(aiostage.load(path, into=blank_like(state, skew=4)))
    await started.wait()
    task.cancel()
    loop.call_soon(release.set)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert in_flight[0] == 0
    assert set(os.listdir("/proc/self/fd")) <= before


def test_page_cache_state_counts_cached_and_dirty_pages(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        needs_cachestat(path)
        os.write(fd, b"x" * (64 * 4096))
        cached, dirty = _records.page_cache_state(fd, 0, 64 * 4096) or (0, 0)
        assert (cached, dirty) == (64, 64)
        os.fsync(fd)
        assert _records.page_cache_state(fd, 0, 64 * 4096) == (64, 0)
        assert _records.page_cache_state(fd, 16 * 4096, 8 * 4096) == (8, 0)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert _records.page_cache_state(fd, 0, 64 * 4096) == (0, 0)
    finally:
        os.close(fd)


async def test_dirty_pages_are_read_through_the_cache(tmp_path: Path) -> None:
    """A window with dirty pages (written, not yet flushed) is read through
    the page cache, which holds the newest bytes, with no direct read."""
    _, path = await saved(tmp_path)
    evict(path)
    entries = _reader._open_archive(str(path))
    records = _records.storage_records(entries, _records.archive_prefix(entries))
    rec = max(records.values(), key=lambda r: r.size)
    start = -(-rec.data_offset // 4096) * 4096
    fd = os.open(path, os.O_RDWR)
    direct = _records.DirectReads()
    try:
        os.pwrite(fd, b"\x00" * 4096, start)  # dirty, not flushed
        direct.open(str(path), fd)
        buffer = mapped_storage(1024 * 1024)  # page-aligned
        window = [storage_view(buffer)]
        assert direct.read(fd, window, start) is None
        assert direct.read(fd, window, start + 1024 * 1024) == 1024 * 1024  # clean, cold
    finally:
        direct.close()
        os.close(fd)


async def test_checking_the_headers_of_an_uncached_file_leaves_it_uncached(
    tmp_path: Path,
) -> None:
    """Local headers read one by one left pieces of the file cached every
    record, and the whole-file read after them left the cache holding the
    file in small pieces (slower to read again).  A file that was not cached
    is dropped from the cache again once its headers are checked; one that
    was cached stays so."""
    sd = {f"t{i}": torch.randn(64 * 1024) for i in range(32)}  # records 256 KiB apart
    path = await aiostage.persist(sd, tmp_path / "ckpt.pt")
    needs_cachestat(path)
    evict(path)
    entries = _reader._open_archive(str(path))
    assert len(entries) > 32
    assert resident_fraction(path) == 0
    read_through_cache(path)
    _reader._open_archive(str(path))
    assert resident_fraction(path) == 1
    loaded = await aiostage.load(path)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def record_header_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Record, in order, every header read and every ``WILLNEED`` advice
    (``("read" | "willneed", offset, nbytes)``) of the archive checks."""
    events: list[tuple[str, int, int]] = []
    advise = os.posix_fadvise
    read = _reader._Headers.read

    def advising(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            events.append(("willneed", offset, length))
        advise(fd, offset, length, advice)

    def reading(self: _reader._Headers, offset: int, nbytes: int) -> bytes:
        events.append(("read", offset, nbytes))
        return read(self, offset, nbytes)

    monkeypatch.setattr(os, "posix_fadvise", advising)
    monkeypatch.setattr(_reader._Headers, "read", reading)
    return events


async def test_the_header_reads_of_an_uncached_file_are_asked_for_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each record's header was read cold, one device round trip after
    another (25-43 ms for 200 records).  Now every header's read is
    advised (``WILLNEED``) before the first is read, and so is each later
    round (the rest of a long extra field) before its reads."""
    sd = {}
    for i in range(24):  # written direct: each on a page, its header's extra field long
        sd[f"t{i}"] = torch.empty(0, dtype=torch.uint8).set_(mapped_storage(MiB))
        sd[f"t{i}"].fill_(i)
    path = await aiostage.persist(sd, tmp_path / "ckpt.pt")
    needs_cachestat(path)
    evict(path)
    events = record_header_reads(monkeypatch)
    entries = _reader._open_archive(str(path))
    reads = [(i, at, n) for i, (kind, at, n) in enumerate(events) if kind == "read"]
    assert len(reads) > len(entries) > 24  # (a second round: the extra fields)

    def advised(upto: int, at: int, n: int) -> bool:
        return any(
            kind == "willneed" and lo <= at and at + n <= lo + length
            for kind, lo, length in events[:upto]
        )

    first_read = reads[0][0]
    first_round = reads[: len(entries)]  # one header read per record, in step
    assert all(advised(first_read, at, n) for _, at, n in first_round)
    assert all(advised(i, at, n) for i, at, n in reads[len(entries) :])
    advices = [e for e in events if e[0] == "willneed"]
    assert len(advices) < len(reads)  # (the small records at the start share one range)
    assert resident_fraction(path) == 0


async def test_the_header_reads_of_a_cached_file_are_not_advised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = {f"t{i}": torch.randn(64 * 1024) for i in range(8)}
    path = await aiostage.persist(sd, tmp_path / "ckpt.pt")
    needs_cachestat(path)
    read_through_cache(path)
    events = record_header_reads(monkeypatch)
    _reader._open_archive(str(path))
    assert any(kind == "read" for kind, _, _ in events)
    assert not [e for e in events if e[0] == "willneed"]


def test_header_prefetches_close_together_are_one_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read is advised with the page after it (a long extra field runs
    on into it), rounded out to pages; ranges within 64 KiB are merged
    (20,000 small records: a few calls, not 20,000)."""
    path = tmp_path / "file"
    path.write_bytes(bytes(4 * MiB))
    needs_cachestat(path)
    evict(path)
    events = record_header_reads(monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    try:
        with _reader._Headers(fd, 4 * MiB) as headers:
            headers.prefetch([(70_000, 20), (100, 10), (9000, 100), (3 * MiB + 5, 4096)])
    finally:
        os.close(fd)
    assert events == [
        ("willneed", 0, 73_728 + 4096),  # 100, 9000 and 70,000: one range
        ("willneed", 3 * MiB, 3 * 4096),
    ]


async def test_a_large_directory_is_checked_a_group_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each check in flight holds a generator, so the records are checked
    in groups (4096); every group's first reads are advised before its
    first read, and the entries come back in the directory's order."""
    monkeypatch.setattr(_reader, "_CHECK_GROUP", 5)
    sd = {f"t{i}": torch.full((300_000,), float(i)) for i in range(12)}  # 1.2 MB apart
    path = await aiostage.persist(sd, tmp_path / "ckpt.pt")
    needs_cachestat(path)
    expected = _reader._open_archive(str(path))
    evict(path)
    events = record_header_reads(monkeypatch)
    entries = _reader._open_archive(str(path))
    assert entries == expected
    assert len(entries) > 3 * 5
    kinds = "".join("r" if kind == "read" else "w" for kind, _, _ in events)
    # advice, then that group's reads, for every group
    assert kinds.count("wr") >= -(-len(entries) // 5)
    got = await aiostage.load(path)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
