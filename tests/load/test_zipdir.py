"""The central directory reader (``aiostage/_load/_zipdir.py``): the same
entries as :mod:`zipfile` reads, for every writer; refusals for the rest."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage
from aiostage._load._zipdir import ZipDirectoryError, read_directory


def state() -> dict[str, Any]:
    return {"w": torch.randn(100), "b": torch.arange(7), "meta": {"step": 3}}


async def write(kind: str, path: Path) -> Path:
    if kind == "torch.save":
        torch.save(state(), path)
    elif kind == "zipfile":  # another writer: deflate-free, a comment, names in cp437
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("top/data.pkl", b"x" * 10)
            zf.writestr("top/data/0", b"y" * 1000)
            zf.comment = b"an archive comment"
    else:
        await aiostage.persist(state(), path, _force_zip64=kind == "aiostage-zip64")
    return path


def directory(path: Path) -> list[Any]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_directory(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["aiostage", "aiostage-zip64", "torch.save", "zipfile"])
async def test_the_same_entries_as_zipfile(tmp_path: Path, kind: str) -> None:
    path = await write(kind, tmp_path / "ckpt.pt")
    ours = directory(path)
    with zipfile.ZipFile(path) as zf:
        theirs = zf.infolist()
    assert len(ours) == len(theirs) > 1
    for a, b in zip(ours, theirs, strict=True):
        for field in (
            "filename",
            "orig_filename",
            "flag_bits",
            "compress_type",
            "CRC",
            "compress_size",
            "file_size",
            "header_offset",
            "external_attr",
        ):
            assert getattr(a, field) == getattr(b, field), (a.filename, field)
        assert a.is_dir() == b.is_dir()


async def test_an_end_signature_inside_the_comment_is_passed_over(tmp_path: Path) -> None:
    """(zipfile takes the last signature in the file for the end record.)"""
    path = await write("zipfile", tmp_path / "ckpt.pt")
    data = path.read_bytes()
    comment = b"holding PK\x05\x06 the end signature"
    data = data[:-20] + len(comment).to_bytes(2, "little") + comment
    path.write_bytes(data)
    assert [e.filename for e in directory(path)] == ["top/data.pkl", "top/data/0"]


@pytest.mark.parametrize(
    "damage",
    ["truncated_end", "truncated_directory", "no_end_record", "count_too_high", "garbage"],
)
async def test_a_directory_that_does_not_parse_is_refused(tmp_path: Path, damage: str) -> None:
    path = await write("aiostage", tmp_path / "ckpt.pt")
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    if damage == "truncated_end":
        data = data[:-5]
    elif damage == "truncated_directory":
        start = int.from_bytes(data[end + 16 : end + 20], "little")
        del data[start + 10 : start + 20]
    elif damage == "no_end_record":
        data[end : end + 4] = b"PK\x00\x00"
    elif damage == "count_too_high":
        count = int.from_bytes(data[end + 10 : end + 12], "little")
        data[end + 8 : end + 12] = (count + 1).to_bytes(2, "little") * 2
    else:
        data = bytearray(os.urandom(4096))
    path.write_bytes(bytes(data))
    with pytest.raises(ZipDirectoryError):
        directory(path)
    with pytest.raises(aiostage.CorruptCheckpointError):
        await aiostage.load(path)
