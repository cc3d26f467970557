"""Odd world sizes, dead or silent partners, cancellation: errors, never hangs."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _distributed import make_event, run_group

from aiostage import PeerTimeoutError, ReplicationError, ReplicationStager


def _state(rank: int) -> dict[str, Any]:
    return {"w": torch.full((256,), float(rank)), "step": rank}


async def _odd_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    # Built before the group exists: the check happens at stage().
    early = ReplicationStager()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with pytest.raises(ValueError, match="even world size; got 3"):
            ReplicationStager()
        with pytest.raises(ValueError, match="even world size; got 3"):
            await early.stage(_state(rank))
        with pytest.raises(ValueError, match="even world size; got 3"):
            await early.recover()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_odd_world_size_raises_value_error() -> None:
    run_group(_odd_worker, 3, init_pg=False, timeout=50)


async def _exits_worker(rank: int, world: int) -> float:
    if rank == 1:
        return 0.0  # the partner leaves without staging
    stager = ReplicationStager(timeout=timedelta(seconds=5))
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError) as info:
        await stager.stage(_state(rank))
    elapsed = time.monotonic() - start
    assert info.value.peer == 1
    assert "partner rank 1" in str(info.value)
    # The channel is out of step now: further exchanges refuse at once.
    with pytest.raises(ReplicationError, match="earlier exchange failed"):
        await stager.stage(_state(rank))
    await stager.close()
    return elapsed


@pytest.mark.timeout(60)
def test_partner_that_exits_raises_peer_timeout() -> None:
    elapsed, _ = run_group(_exits_worker, 2, timeout=50)
    assert elapsed < 5 + 3


async def _silent_worker(rank: int, world: int, done: Any) -> tuple[float, float]:
    import torch.distributed as dist

    elapsed = lag = 0.0
    if rank == 1:
        # Alive but never answers, until rank 0 has seen its error.
        assert done.wait(timeout=40)
        stager = ReplicationStager(timeout=timedelta(seconds=20))
    else:
        try:
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal lag
                loop = asyncio.get_running_loop()
                while not stop.is_set():
                    before = loop.time()
                    await asyncio.sleep(0.01)
                    lag = max(lag, loop.time() - before - 0.01)

            tick = asyncio.create_task(ticker())
            stager = ReplicationStager(timeout=timedelta(seconds=2))
            start = time.monotonic()
            with pytest.raises(PeerTimeoutError) as info:
                await stager.stage(_state(rank))
            elapsed = time.monotonic() - start
            stop.set()
            await tick
            assert info.value.peer == 1
            assert "within 2 s" in str(info.value)
        finally:
            done.set()
    # The timeout closed the pair's connection in the old group; a fresh group
    # brings the pair back in step (recover(pg=...) bypasses the refusal).
    fresh = dist.new_group(backend="gloo")
    assert await stager.recover(pg=fresh) is None  # nobody holds anything yet
    await stager.close()
    async with ReplicationStager(pg=fresh, timeout=timedelta(seconds=20)) as again:
        replica = await again.stage(_state(rank))
    assert torch.equal(replica["w"], _state(1 - rank)["w"])
    return elapsed, lag


@pytest.mark.timeout(60)
def test_silent_partner_times_out_and_loop_stays_responsive() -> None:
    done = make_event()
    (elapsed, lag), _ = run_group(_silent_worker, 2, done, timeout=50)
    assert 1.5 <= elapsed < 2 + 3
    assert lag < 0.5  # the event loop kept running while the exchange waited


async def _cancel_worker(rank: int, world: int, done: Any) -> float:
    if rank == 1:
        assert done.wait(timeout=40)
        return 0.0
    try:
        stager = ReplicationStager(timeout=timedelta(seconds=2))
        task = asyncio.create_task(stager.stage(_state(rank)))
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(task, 0.2)
        elapsed = time.monotonic() - start
        assert task.cancelled()
        with pytest.raises(ReplicationError, match="earlier exchange failed"):
            await stager.stage(_state(rank))
        await stager.close()
        return elapsed
    finally:
        done.set()


@pytest.mark.timeout(60)
def test_cancelled_stage_waits_for_the_operation_in_flight_only() -> None:
    done = make_event()
    elapsed, _ = run_group(_cancel_worker, 2, done, timeout=50)
    # The send in flight is bounded by the 2 s timeout; nothing waits longer.
    assert elapsed < 2 + 3


def _names(directory: str) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


async def _half_message_worker(rank: int, world: int, storage_dir: str, done: Any) -> None:
    import torch.distributed as dist

    from aiostage._replicate import _transport
    from aiostage._replicate._stager import replica_filename

    async with ReplicationStager(timeout=timedelta(seconds=2), storage_dir=storage_dir) as stager:
        await stager.stage(_state(rank))  # a good round first: rank 1 now has a replica file
    if rank == 0:
        # Rank 0 announces a state (header and metadata) and then goes silent.
        enc = _transport.encode({"a": torch.ones(1000), "b": torch.zeros(10)})
        channel = _transport.Channel(
            dist.group.WORLD, 1, 1, timedelta(seconds=20), torch.device("cpu")
        )
        header = torch.tensor(
            [_transport.MAGIC, _transport.VERSION, _transport.KIND_STAGE, 1, len(enc.meta), 2]
        )
        channel._wait(channel._post("send", header, "header"), "header")
        meta = torch.frombuffer(bytearray(enc.meta), dtype=torch.uint8)
        channel._wait(channel._post("send", meta, "meta"), "meta")
        assert done.wait(timeout=40)
        return
    try:
        path = Path(storage_dir) / replica_filename(1, 0)
        before = path.read_bytes()
        stager = ReplicationStager(timeout=timedelta(seconds=2), storage_dir=storage_dir)
        with pytest.raises(PeerTimeoutError, match="receiving a storage"):
            await stager.stage(_state(rank))
        # The writer had started on the announced state: it was stopped, its
        # temp file removed, and the previous replica file is intact.
        assert path.read_bytes() == before
        assert _names(storage_dir) == sorted([replica_filename(0, 1), replica_filename(1, 0)])
        await stager.close()
    finally:
        done.set()


@pytest.mark.timeout(60)
def test_partner_silent_mid_message_keeps_previous_replica_file(tmp_path: Path) -> None:
    done = make_event()
    run_group(_half_message_worker, 2, str(tmp_path), done, timeout=50)


async def _bad_state_worker(rank: int, world: int) -> float:
    from aiostage import StagingError

    async with ReplicationStager(timeout=timedelta(seconds=20)) as stager:
        start = time.monotonic()
        if rank == 1:
            with pytest.raises(StagingError):
                await stager.stage({"sparse": torch.eye(3).to_sparse()})
        else:
            with pytest.raises(ReplicationError, match="failed to stage") as info:
                await stager.stage(_state(rank))
            assert info.value.peer == 1
        elapsed = time.monotonic() - start
        # The pair stayed in step: the next round works.
        replica = await stager.stage(_state(rank))
        assert torch.equal(replica["w"], _state(1 - rank)["w"])
    return elapsed


@pytest.mark.timeout(60)
def test_partner_that_cannot_stage_fails_fast_and_stays_in_step() -> None:
    elapsed, _ = run_group(_bad_state_worker, 2, timeout=50)
    assert elapsed < 10  # told by the partner, not by the 20 s timeout
