"""get_state/set_state: bit-exact resume through a CheckpointManager, across wrappers."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import aiostage
from aiostage import CheckpointManager, get_state, set_state

OptFactory = Callable[[Any], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptFactory] = {
    "sgd_momentum": lambda params: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, weight_decay=1e-3
    ),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
}


def build(seed: int, make_opt: OptFactory) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25),  # draws from the global torch RNG every step
        torch.nn.Linear(32, 4),
    )
    return model, make_opt(model.parameters())


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        # Python's and NumPy's RNGs take part too, so restoring them matters.
        scale = 1.0 + random.random() * 0.1 + float(np.random.rand()) * 0.1
        loss = torch.nn.functional.mse_loss(model(x) * scale, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from leaves(obj[key], f"{prefix}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from leaves(item, f"{prefix}.{i}")
    else:
        yield prefix, obj


def assert_bitwise_equal(a: Any, b: Any) -> None:
    """Same structure, same primitives, tensors equal byte for byte (dtype and shape too)."""
    la, lb = list(leaves(a)), list(leaves(b))
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (key, x), (_, y) in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), key
            assert (x.dtype, x.shape) == (y.dtype, y.shape), key
            xb = x.detach().contiguous().view(-1).view(torch.uint8)
            yb = y.detach().contiguous().view(-1).view(torch.uint8)
            assert torch.equal(xb, yb), f"{key} differs"
        else:
            assert x == y, key


def training_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    state = get_state(model, opt, rng=False)
    return {"model": state["model"], "optim": state["optim"]}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
async def test_resume_is_bit_exact(tmp_path: Path, opt_name: str) -> None:
    make_opt = OPTIMIZERS[opt_name]
    total, k = 12, 5

    # Uninterrupted run.
    model, opt = build(0, make_opt)
    seed_all(7)
    train(model, opt, 0, total)
    expected = training_state(model, opt)

    # k steps, checkpoint, then everything rebuilt from scratch.
    model, opt = build(0, make_opt)
    seed_all(7)
    train(model, opt, 0, k)
    async with CheckpointManager(tmp_path, keep_last=1) as mgr:
        await mgr.save(k, get_state(model, opt, extra={"step": k, "data_position": k}))
    del model, opt

    fresh_model, fresh_opt = build(123, make_opt)  # different weights, empty optimizer
    seed_all(999)  # different RNG streams until restored
    async with CheckpointManager(tmp_path) as mgr:
        assert mgr.steps() == [k]
        restored = await mgr.restore()
    extra = set_state(fresh_model, fresh_opt, restored)
    assert extra == {"step": k, "data_position": k}
    train(fresh_model, fresh_opt, extra["data_position"], total)
    assert_bitwise_equal(training_state(fresh_model, fresh_opt), expected)


def test_rng_state_round_trips() -> None:
    state = aiostage.get_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand(3))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    aiostage.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(a[0], b[0])
    assert a[1] == b[1]
    assert np.array_equal(a[2], b[2])


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_get_state_before_first_step_does_not_change_training(opt_name: str) -> None:
    # get_state_dict initialises an empty optimizer with a zero-lr step
    # (Adam's step would become 1); get_state must leave no trace of it,
    # and restoring such a state must leave a fresh optimizer fresh.
    make_opt = OPTIMIZERS[opt_name]
    model, opt = build(0, make_opt)
    state = get_state(model, opt)
    assert not opt.state
    assert state["optim"]["state"] == {}
    seed_all(3)
    train(model, opt, 0, 3)

    other, other_opt = build(5, make_opt)
    set_state(other, other_opt, build_state_at_zero(make_opt))
    assert not other_opt.state
    seed_all(3)
    train(other, other_opt, 0, 3)
    assert_bitwise_equal(training_state(other, other_opt), training_state(model, opt))


def build_state_at_zero(make_opt: OptFactory) -> dict[str, Any]:
    model, opt = build(0, make_opt)
    return get_state(model, opt, rng=False)


def test_several_optimizers_are_one_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opts = [
        torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(model[1].parameters(), lr=0.01),
    ]
    model(torch.randn(2, 4)).sum().backward()
    for o in opts:
        o.step()
    state = get_state(model, opts)
    assert set(state["optim"]["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}

    torch.manual_seed(9)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    other_opts = [
        torch.optim.SGD(other[0].parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(other[1].parameters(), lr=0.01),
    ]
    set_state(other, other_opts, state)
    assert_bitwise_equal(get_state(other, other_opts, rng=False)["optim"], state["optim"])
    assert_bitwise_equal(other.state_dict(), model.state_dict())


@pytest.mark.parametrize("direction", ["plain_to_compiled", "compiled_to_plain"])
async def test_restore_across_torch_compile(tmp_path: Path, direction: str) -> None:
    make_opt = OPTIMIZERS["adam"]

    def make(seed: int, compiled: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model, _ = build(seed, make_opt)
        model.eval()  # no dropout: the eager and compiled paths draw identically anyway
        wrapped = torch.compile(model, backend="eager") if compiled else model
        assert isinstance(wrapped, torch.nn.Module)
        return wrapped, make_opt(wrapped.parameters())

    src_compiled = direction == "compiled_to_plain"
    src, src_opt = make(0, src_compiled)
    train(src, src_opt, 0, 3)
    saved = get_state(src, src_opt)
    if src_compiled:
        assert not any(k.startswith("_orig_mod.") for k in saved["model"])
    async with CheckpointManager(tmp_path) as mgr:
        await mgr.save(3, saved)
        restored = await mgr.restore()

    dst, dst_opt = make(1, not src_compiled)
    set_state(dst, dst_opt, restored)
    assert_bitwise_equal(training_state(dst, dst_opt), training_state(src, src_opt))
    # And both go on identically.
    for model, opt in ((src, src_opt), (dst, dst_opt)):
        seed_all(4)
        train(model, opt, 3, 5)
    assert_bitwise_equal(training_state(dst, dst_opt), training_state(src, src_opt))
