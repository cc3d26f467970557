"""Bit flips anywhere in a small checkpoint: ``load(verify=True)`` returns the
original state or raises an aiostage load error, never anything else."""

from __future__ import annotations

import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage
from aiostage import CheckpointLoadError


def small_state() -> dict[str, Any]:
    base = torch.arange(40, dtype=torch.float32)
    return {"a": base, "view": base[8:16], "i": torch.tensor([1, -2, 3], dtype=torch.int16), "n": 7}


def same(got: Any, want: dict[str, Any]) -> bool:
    if not isinstance(got, dict) or got.keys() != want.keys():
        return False
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            other = got[key]
            if not (
                isinstance(other, torch.Tensor)
                and other.dtype == value.dtype
                and other.shape == value.shape
                and other.stride() == value.stride()
                and torch.equal(other, value)
            ):
                return False
        elif type(got[key]) is not type(value) or got[key] != value:
            return False
    return True


def flip_offsets(raw: bytes, path: Path) -> list[int]:
    """Every byte of the headers, the pickle and the central directory; every
    8th byte of other records' contents and of local headers' padding."""
    sampled: set[int] = set()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            local = raw[info.header_offset : info.header_offset + 30]
            extra = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
            start = extra + int.from_bytes(local[28:30], "little")
            sampled.update(range(extra + 4, start))  # padding, past its block header
            if not info.filename.endswith("/data.pkl"):
                sampled.update(range(start, start + info.compress_size))
    return [off for off in range(len(raw)) if off not in sampled or off % 8 == 0]


async def write_aiostage(state: dict[str, Any], path: Path) -> None:
    await aiostage.persist(state, path)


async def write_aiostage_zip64(state: dict[str, Any], path: Path) -> None:
    from aiostage._persist._writer import persist

    await persist(state, path, _force_zip64=True)


async def write_torch(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)


@pytest.mark.parametrize(
    ("writer", "directory_only"),
    [(write_aiostage, False), (write_torch, False), (write_aiostage_zip64, True)],
)
async def test_every_bit_flip_is_caught_or_harmless(
    tmp_path: Path, writer: Any, directory_only: bool
) -> None:
    """``directory_only``: flip only the central directory and end records
    (for zip64, where they differ from the plain layout)."""
    state = small_state()
    good = tmp_path / "good.pt"
    await writer(state, good)
    assert same(await aiostage.load(good, verify=True), state)
    raw = good.read_bytes()
    bad = tmp_path / "bad.pt"
    wrong: list[tuple[int, int]] = []
    foreign: list[tuple[int, int, str]] = []
    caught = 0
    start = time.perf_counter()
    offsets = flip_offsets(raw, good)
    if directory_only:
        with zipfile.ZipFile(good) as zf:
            offsets = [off for off in offsets if off >= zf.start_dir]
    tried = len(offsets)
    for off in offsets:
        bit = off % 8
        flipped = bytearray(raw)
        flipped[off] ^= 1 << bit
        bad.write_bytes(flipped)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. torch's "pickle protocol" warning
                got = await aiostage.load(bad, verify=True)
        except CheckpointLoadError:
            caught += 1
            continue
        except Exception as exc:
            foreign.append((off, bit, f"{type(exc).__name__}: {exc}"))
            continue
        if not same(got, state):
            wrong.append((off, bit))
    elapsed = time.perf_counter() - start
    print(f"{len(raw)} bytes, {caught} of {tried} flips caught, {elapsed:.2f}s")
    assert not foreign, foreign[:5]
    assert not wrong, wrong[:20]
    assert caught > tried // 2
