"""The accelerator path on a real GPU (skipped on machines without one)."""

from __future__ import annotations

import time

import pytest
import torch
from _ticker import LoopTicker

from aiostage import DefaultStager, StagingOptions, StateDictStager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.accelerator.is_available(), reason="needs an accelerator"),
]


def device() -> torch.device:
    acc = torch.accelerator.current_accelerator()
    assert acc is not None
    return acc


def test_engine_pins_large_storages_only() -> None:
    dev = device()
    stager = StateDictStager(pin_memory=True, pin_memory_min_bytes=1024)
    out = stager.stage({"big": torch.randn(4096, device=dev), "small": torch.randn(4, device=dev)})
    assert out["big"].device.type == "cpu" and out["big"].is_pinned()
    assert not out["small"].is_pinned()
    stager.close()


async def test_default_stager_copies_from_the_device_without_blocking_the_loop() -> None:
    dev = device()
    sd = {f"w{i}": torch.randn(16 * 1024 * 1024 // 4, device=dev) for i in range(32)}
    async with DefaultStager() as stager:
        assert stager.options.pinned and stager.options.non_blocking
        for _ in range(2):
            start = time.perf_counter()
            async with LoopTicker() as ticker:
                staged = await stager.stage(sd)
            elapsed = time.perf_counter() - start
            for key, value in sd.items():
                assert staged[key].device.type == "cpu"
                assert torch.equal(staged[key], value.cpu()), key
            assert ticker.max_gap < 0.1 and ticker.max_gap < max(elapsed, 0.004) * 0.9 + 0.05


async def test_stage_orders_after_pending_compute() -> None:
    dev = device()
    x = torch.randn(2048, 2048, device=dev)
    async with DefaultStager() as stager:
        for _ in range(3):
            y = x @ x  # queued on the compute stream, likely still running
            y.add_(1)
            staged = await stager.stage({"y": y})
            assert torch.equal(staged["y"], y.cpu())


async def test_blocking_copy_option_on_the_device() -> None:
    dev = device()
    sd = {"a": torch.randn(1 << 20, device=dev)}
    opts = StagingOptions(use_pinned_memory=False, use_non_blocking_copy=False)
    async with DefaultStager(opts) as stager:
        staged = await stager.stage(sd)
    assert not staged["a"].is_pinned()
    assert torch.equal(staged["a"], sd["a"].cpu())
