"""Legacy (pre-1.6, non-zip) ``torch.save`` files: read whole by torch.load,
weights_only, and refused with a clear error where a zip archive is needed."""

from __future__ import annotations

import fractions
from pathlib import Path

import pytest
import torch
from _compare import assert_same
from _states import mixed_state

import aiostage
from aiostage import CheckpointLoadError, CorruptCheckpointError, UnsafeCheckpointError


def save_legacy(obj: object, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


async def test_a_legacy_file_loads_as_torch_load_reads_it(tmp_path: Path) -> None:
    state = mixed_state()
    path = save_legacy(state, tmp_path / "old.pt")
    seen: list[tuple[int, int]] = []
    got = await aiostage.load(path, progress=lambda done, total: seen.append((done, total)))
    assert_same(got, torch.load(path, weights_only=True))
    views = got["views"]
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()
    assert seen == [(path.stat().st_size, path.stat().st_size)]
    on_meta = await aiostage.load(path, map_location="meta")
    assert on_meta["model"]["w"].device.type == "meta"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"verify": True}, "verify=True"),
        ({"mmap": True}, "mmap=True"),
        ({"into": {"w": torch.zeros(3)}}, "into="),
    ],
)
async def test_a_legacy_file_refuses_what_needs_a_zip_archive(
    tmp_path: Path, kwargs: dict[str, object], named: str
) -> None:
    path = save_legacy({"w": torch.ones(3)}, tmp_path / "old.pt")
    with pytest.raises(CheckpointLoadError, match="legacy") as info:
        await aiostage.load(path, **kwargs)  # type: ignore[arg-type]
    assert not isinstance(info.value, CorruptCheckpointError)
    assert named in str(info.value) and str(path) in str(info.value)


async def test_verify_records_says_a_legacy_file_has_no_crcs(tmp_path: Path) -> None:
    from aiostage._load._reader import verify_records

    path = save_legacy({"w": torch.ones(3)}, tmp_path / "old.pt")
    with pytest.raises(CheckpointLoadError, match="no CRC-32s") as info:
        await verify_records(path)
    assert not isinstance(info.value, CorruptCheckpointError)


async def test_a_legacy_file_is_still_weights_only(tmp_path: Path) -> None:
    path = save_legacy({"lr": fractions.Fraction(1, 3)}, tmp_path / "old.pt")
    with pytest.raises(UnsafeCheckpointError, match="Fraction"):
        await aiostage.load(path)
    got = await aiostage.load(path, safe_globals=[fractions.Fraction])
    assert got == {"lr": fractions.Fraction(1, 3)}


async def test_a_truncated_legacy_file_is_corrupt(tmp_path: Path) -> None:
    path = save_legacy({"w": torch.randn(10_000)}, tmp_path / "old.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as info:
        await aiostage.load(path)
    assert str(path) in str(info.value)


async def test_other_files_that_are_not_zip_archives_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(b"\x80\x02" + bytes(range(256)) * 8)  # a pickle header, no magic
    with pytest.raises(CorruptCheckpointError, match=r"not a torch\.save zip archive"):
        await aiostage.load(path)
