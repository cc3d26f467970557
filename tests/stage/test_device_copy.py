"""The accelerator path, on a simulated device whose copies complete later."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import anyio
import anyio.to_thread
import pytest
import torch
from _simdevice import SimulatedDevice

from aiostage import CacheInfo, DefaultStager, StagingError, StagingOptions

OPTS = StagingOptions(use_non_blocking_copy=True, chunk_bytes=64 * 1024)


@pytest.fixture
def device() -> Iterator[SimulatedDevice]:
    sim = SimulatedDevice(gate_open=False)
    yield sim
    sim.stop()


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1 << 16, generator=g)
    return {"base": base, "view": base[100:200], "other": torch.randn(1 << 17, generator=g)}


async def test_stage_returns_only_after_device_copies_land(device: SimulatedDevice) -> None:
    sd = make_state()
    async with DefaultStager(OPTS, _device_ops=device) as stager:
        task = asyncio.create_task(stager.stage(sd))
        await anyio.to_thread.run_sync(device.first_issue.wait)
        # The device holds its copies; the stager keeps polling, the loop runs.
        await device.wait_for_queries(5)
        assert not task.done()
        assert device.executed == 0
        device.gate.set()
        staged = await task
    assert device.executed == device.issued > 1
    assert torch.equal(staged["base"], sd["base"]) and torch.equal(staged["other"], sd["other"])
    assert (
        staged["view"].untyped_storage().data_ptr() == staged["base"].untyped_storage().data_ptr()
    )
    # The side stream waited for the compute stream before the first copy.
    assert device.calls.index("wait_for_compute") < device.calls.index("copy_async")
    assert device.calls.count("new_stream") == 1


async def test_side_stream_is_reused_across_stages(device: SimulatedDevice) -> None:
    device.gate.set()
    sd = make_state()
    async with DefaultStager(OPTS, _device_ops=device) as stager:
        await stager.stage(sd)
        await stager.stage(sd)
    assert device.calls.count("new_stream") == 1
    assert device.calls.count("wait_for_compute") == 2


async def test_cancel_waits_for_copies_in_flight(device: SimulatedDevice) -> None:
    sd = make_state()
    async with DefaultStager(OPTS, _device_ops=device) as stager:
        device.gate.set()
        first = await stager.stage(sd)
        info = stager.cache_info()
        device.gate.clear()
        sd["other"].add_(1)
        task = asyncio.create_task(stager.stage(sd))
        await anyio.to_thread.run_sync(device.first_issue.wait)
        task.cancel()
        # Cancelled, but the device still holds copies into our buffers: the
        # stage must keep waiting for them instead of returning.
        polled = device.queries
        await device.wait_for_queries(polled + 5)
        assert not task.done()
        device.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Every issued copy ran before the cancellation came back out.
        assert device.executed == device.issued
        issued = device.issued
        assert stager.cache_info() == info
        staged = await stager.stage(sd)
        assert device.issued > issued
        assert torch.equal(staged["other"], sd["other"])
        assert staged["other"].data_ptr() == first["other"].data_ptr()


async def test_device_error_names_the_tensor(device: SimulatedDevice) -> None:
    device.gate.set()
    sd = make_state()
    device.fail_on = sd["other"].untyped_storage()
    async with DefaultStager(OPTS, _device_ops=device) as stager:
        with pytest.raises(StagingError, match="simulated device error") as err:
            await stager.stage(sd)
        assert err.value.path == "other"
        assert stager.cache_info() == CacheInfo(0, 0)


async def test_blocking_device_copies_run_in_a_worker_thread(device: SimulatedDevice) -> None:
    sd = make_state()
    opts = StagingOptions(use_non_blocking_copy=False, chunk_bytes=64 * 1024)
    async with DefaultStager(opts, _device_ops=device) as stager:
        task = asyncio.create_task(stager.stage(sd))
        await anyio.to_thread.run_sync(device.first_issue.wait)
        # A worker thread is blocked in the copy; the loop is free.
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()
        device.gate.set()
        staged = await task
    assert "copy_async" not in device.calls
    assert torch.equal(staged["other"], sd["other"])


async def test_task_cancel_never_abandons_a_copy_thread(device: SimulatedDevice) -> None:
    # A plain Task.cancel() (what asyncio.timeout and wait_for do) must not let
    # stage() return while a worker thread still copies into its buffers.
    sd = make_state()
    opts = StagingOptions(use_non_blocking_copy=False, chunk_bytes=64 * 1024)
    async with DefaultStager(opts, _device_ops=device) as stager:
        task = asyncio.create_task(stager.stage(sd))
        await anyio.to_thread.run_sync(device.first_issue.wait)
        task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()  # still waiting for the blocked copy thread
        device.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert device.executed == device.issued == 1  # no copy started after the cancel
        assert stager.cache_info() == CacheInfo(0, 0)


async def test_timeout_waits_for_queued_device_copies(device: SimulatedDevice) -> None:
    sd = make_state()
    async with DefaultStager(OPTS, _device_ops=device) as stager:
        timeouts: list[asyncio.Timeout] = []

        async def stage_with_timeout() -> None:
            async with asyncio.timeout(None) as timeout:
                timeouts.append(timeout)
                await stager.stage(sd)

        task = asyncio.create_task(stage_with_timeout())
        await anyio.to_thread.run_sync(device.first_issue.wait)
        timeouts[0].reschedule(asyncio.get_running_loop().time())  # expire now
        await device.wait_for_queries(device.queries + 5)
        assert not task.done()
        device.gate.set()
        with pytest.raises(TimeoutError):
            await task
        assert device.executed == device.issued


def test_a_source_resized_since_the_plan_is_a_staging_error_naming_it() -> None:
    """The byte views of a batch refuse bytes past a storage's end (torch's
    set_ would grow the caller's storage): the device copier reports it as a
    StagingError with the key path."""
    from aiostage._stage._device_copy import _segments
    from aiostage._stage._plan import CopyBatch, CopyRequest, Segment
    from aiostage._stage._traverse import ROOT

    src = torch.zeros(1000).untyped_storage()
    dst = torch.zeros(1000).untyped_storage()
    req = CopyRequest(src, dst, 4000, (ROOT, "w"))
    src.resize_(100)
    with pytest.raises(StagingError, match="past the end") as err:
        list(_segments([req], CopyBatch((Segment(0, 0, 4000),), 4000)))
    assert err.value.path == "w"
    assert src.nbytes() == 100
