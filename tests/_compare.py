"""Structural, bit-exact comparison of two states (tests' shared helper)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

import aiostage

#: The dtypes every round-trip test covers.
ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def _raw(t: torch.Tensor) -> bytes:
    """All bytes of the tensor's storage (bit-exact comparison, NaN-safe)."""
    s = t.untyped_storage()
    return bytes(torch.empty(0, dtype=torch.uint8).set_(s).tolist())


def assert_same(got: Any, want: Any, where: str = "<root>") -> None:
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, where
        assert got.shape == want.shape, where
        assert got.stride() == want.stride(), where
        assert got.storage_offset() == want.storage_offset(), where
        assert got.requires_grad == want.requires_grad, where
        assert got.device == want.device, where
        assert _raw(got) == _raw(want), where
    elif isinstance(want, dict):
        assert list(got.keys()) == list(want.keys()), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{where}.{i}")
    elif dataclasses.is_dataclass(want):
        assert_same(dataclasses.asdict(got), dataclasses.asdict(want), where)  # type: ignore[arg-type]
    else:
        assert got == want, where


async def write(writer: str, state: Any, path: Path) -> Path:
    """Write ``state`` with ``aiostage`` (persist) or ``torch.save``."""
    if writer == "aiostage":
        await aiostage.persist(state, path)
    else:
        torch.save(state, path)
    return path
