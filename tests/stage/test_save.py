"""The stagers' persist() and pipelined save()."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from _simdevice import SimulatedDevice

from aiostage import BlockingAsyncStager, DefaultStager, PersistError, StagingError, StagingOptions

MiB = 1024 * 1024


def make_state(seed: int = 0, n: int = 8, numel: int = 1 << 18) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    state: dict[str, Any] = {f"w{i}": torch.randn(numel, generator=g) for i in range(n)}
    state.update({"base": base, "view": base[10:100], "step": seed})
    return state


def assert_loaded_equals(path: Path, expected: dict[str, Any]) -> None:
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value
    assert (
        loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    )


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if "aiostage-tmp" in p.name]


@pytest.fixture
def sim() -> Iterator[SimulatedDevice]:
    device = SimulatedDevice(gate_open=False)
    yield device
    device.stop()


async def test_persist_of_a_staged_state(tmp_path: Path) -> None:
    sd = make_state()
    async with DefaultStager() as stager:
        staged = await stager.stage(sd)
        path = await stager.persist(staged, tmp_path / "ckpt.pt")
    assert path == tmp_path / "ckpt.pt"
    assert_loaded_equals(path, sd)


async def test_save_returns_once_staged_and_file_holds_that_state(tmp_path: Path) -> None:
    sd = make_state()
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    async with DefaultStager() as stager:
        handle = await stager.save(sd, tmp_path / "ckpt.pt")
        # Training goes on and mutates the live state while the write runs.
        for value in sd.values():
            if isinstance(value, torch.Tensor):
                value.add_(1)
        assert await handle.wait() == tmp_path / "ckpt.pt"
        assert handle.done()
    assert_loaded_equals(tmp_path / "ckpt.pt", expected)
    assert temp_files(tmp_path) == []


async def test_writer_waits_for_each_storage_to_land(tmp_path: Path, sim: SimulatedDevice) -> None:
    # The writer starts as soon as the plan exists; the device holds its
    # copies.  Had the writer not waited per storage, it would have written
    # the empty staging buffers.
    sd = make_state(numel=1 << 16)
    opts = StagingOptions(use_non_blocking_copy=True, chunk_bytes=64 * 1024)
    async with DefaultStager(opts, _device_ops=sim) as stager:
        task = asyncio.create_task(stager.save(sd, tmp_path / "ckpt.pt"))
        await anyio.to_thread.run_sync(sim.first_issue.wait)
        await sim.wait_for_queries(3)
        assert not task.done()
        assert not (tmp_path / "ckpt.pt").exists()
        sim.gate.set()
        handle = await task
        await handle.wait()
    assert_loaded_equals(tmp_path / "ckpt.pt", sd)


async def test_next_stage_waits_until_the_write_no_longer_reads_the_buffers(
    tmp_path: Path,
) -> None:
    sd = make_state(n=16)
    expected = sd["w0"].clone()
    async with DefaultStager() as stager:
        handle = await stager.save(sd, tmp_path / "ckpt.pt")
        assert not handle.done()
        sd["w0"].add_(1)
        staged = await stager.stage(sd)
        # The stage could only refresh the buffers once the write was over.
        assert handle.done()
        await handle.wait()
    assert torch.equal(staged["w0"], sd["w0"])
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=True)["w0"], expected)


async def test_write_error_surfaces_at_wait_and_releases_the_stager(tmp_path: Path) -> None:
    sd = make_state(n=2)
    async with DefaultStager() as stager:
        handle = await stager.save(sd, tmp_path / "missing-dir" / "ckpt.pt")
        with pytest.raises(PersistError) as err:
            await handle.wait()
        assert "missing-dir" in str(err.value)
        # The buffers were released: staging works again.
        staged = await stager.stage(sd)
        assert torch.equal(staged["w1"], sd["w1"])


async def test_cancelled_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    previous = make_state(seed=1, n=2)
    async with DefaultStager() as stager:
        await (await stager.save(previous, target)).wait()
        handle = await stager.save(make_state(seed=2, n=32), target)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle.wait()
    assert_loaded_equals(target, previous)
    assert temp_files(tmp_path) == []


async def test_leaving_the_block_waits_for_background_writes(tmp_path: Path) -> None:
    sd = make_state(n=4)
    async with DefaultStager() as stager:
        handle = await stager.save(sd, tmp_path / "ckpt.pt")
    assert handle.done() and not handle.cancelled()
    assert_loaded_equals(tmp_path / "ckpt.pt", sd)


async def test_cancelling_the_block_cancels_background_writes(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    previous = make_state(seed=3, n=2)
    torch.save(previous, target)
    handles = []

    async def run() -> None:
        async with DefaultStager() as stager:
            handles.append(await stager.save(make_state(seed=4, n=32), target))
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await run()
    assert handles[0].done()
    assert handles[0].cancelled()
    assert_loaded_equals(target, previous)
    assert temp_files(tmp_path) == []


async def test_blocking_stager_save(tmp_path: Path) -> None:
    sd = make_state(n=3)
    async with BlockingAsyncStager() as stager:
        handle = await stager.save(sd, tmp_path / "ckpt.pt")
        await handle.wait()
    assert_loaded_equals(tmp_path / "ckpt.pt", sd)


async def test_persist_holds_the_turn_so_stage_cannot_refresh_its_buffers(
    tmp_path: Path,
) -> None:
    sd = make_state(n=16)
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    async with DefaultStager() as stager:
        staged = await stager.stage(sd)
        writing = asyncio.create_task(stager.persist(staged, tmp_path / "ckpt.pt"))
        await asyncio.sleep(0)  # the write takes the turn
        for value in sd.values():
            if isinstance(value, torch.Tensor):
                value.add_(1)
        await stager.stage(sd)  # waits for the write to finish
        assert writing.done()
        await writing
    assert_loaded_equals(tmp_path / "ckpt.pt", expected)


@pytest.mark.parametrize("kind", ["default", "blocking"])
async def test_save_refuses_a_storage_viewed_with_two_dtypes_up_front(
    tmp_path: Path, kind: str
) -> None:
    base = torch.randn(8)
    sd = {"f": base, "opt": {"bits": base.view(torch.int32)}}
    stager: Any = (
        DefaultStager() if kind == "default" else BlockingAsyncStager(cache_staged_state_dict=True)
    )
    async with stager:
        staged = await stager.stage(sd)  # staging such a state is fine
        assert torch.equal(staged["opt"]["bits"], sd["opt"]["bits"])
        with pytest.raises(StagingError, match="two dtypes") as err:
            await stager.save(sd, tmp_path / "ckpt.pt")
        assert err.value.path == "opt.bits"
        assert not (tmp_path / "ckpt.pt").exists()
        assert temp_files(tmp_path) == []
        # The stager is usable afterwards.
        handle = await stager.save({"f": base}, tmp_path / "ok.pt")
        await handle.wait()
