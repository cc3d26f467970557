"""The central directory of a zip archive, read without :mod:`zipfile`.

``zipfile.ZipFile`` parses the whole directory in one call of pure Python:
for a checkpoint of 20,000 records that is 80-90 ms holding the GIL, and the
event loop's thread got it back only every switch interval (5 ms) meanwhile.
This reader parses the same fields with ``struct``, a few microseconds per
record, handing the GIL over every millisecond (see ``GilTurns``).  It takes
what ``torch.save`` and aiostage write (zip64 included) and is strict about
the rest: anything it cannot account for raises :class:`ZipDirectoryError`,
which the loader reports as a corrupt checkpoint.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from aiostage._threads import GilTurns

__all__ = ["CentralEntry", "ZipDirectoryError", "read_directory", "widen", "zip64_values"]

_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_CENTRAL_SIG = b"PK\x01\x02"
_ZIP64_EXTRA = 0x0001
_UTF8_FLAG = 0x0800
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_MAX_COMMENT = 0xFFFF


class ZipDirectoryError(Exception):
    """The archive's end records or central directory do not parse."""


class CentralEntry(NamedTuple):
    """One record's entry in the central directory (the fields ``zipfile.ZipInfo``
    would carry under the same names)."""

    filename: str  # cut at a NUL byte, as zipfile does
    orig_filename: str
    raw_name: bytes
    flag_bits: int
    compress_type: int
    CRC: int
    compress_size: int
    file_size: int
    header_offset: int
    external_attr: int

    def is_dir(self) -> bool:
        return self.filename.endswith("/")


def zip64_values(extra: bytes) -> list[int]:
    """The 64-bit values of the zip64 block in a header's extra field (none
    if it has no such block).

    Raises:
        ZipDirectoryError: a block of the extra field runs past its end.
    """
    pos = 0
    while pos + 4 <= len(extra):
        ident, size = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + size > len(extra):
            raise ZipDirectoryError("an extra field runs past its header")
        body = extra[pos + 4 : pos + 4 + size]
        if ident == _ZIP64_EXTRA:
            return [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
        pos += 4 + size
    return []


def widen(fields: tuple[int, ...], extra: bytes) -> tuple[int, ...] | None:
    """``fields`` with each one at ``0xFFFFFFFF`` (stands for "in the zip64
    block") replaced, in order, by the next value of the zip64 block in the
    header's ``extra`` field; ``None`` where the block holds too few.

    Raises:
        ZipDirectoryError: a block of the extra field runs past its end.
    """
    values = iter(zip64_values(extra))
    out = []
    for field in fields:
        if field == _U32_MAX:
            field = next(values, -1)
            if field < 0:
                return None
        out.append(field)
    return tuple(out)


def _end_records(fd: int, size: int) -> tuple[int, int, int]:
    """(entries, directory offset, directory size) from the end records."""
    tail_len = min(size, _EOCD.size + _MAX_COMMENT)
    tail = os.pread(fd, tail_len, size - tail_len)
    at = tail.rfind(_EOCD_SIG)
    # The last signature whose record and comment end the file (another may
    # sit inside a comment).
    while at >= 0 and not (
        at + _EOCD.size <= len(tail)
        and at + _EOCD.size + struct.unpack_from("<H", tail, at + 20)[0] == len(tail)
    ):
        at = tail.rfind(_EOCD_SIG, 0, at)
    if at < 0:
        raise ZipDirectoryError("no end of central directory record (truncated?)")
    _, disk, cd_disk, on_disk, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    eocd_at = size - tail_len + at
    end = eocd_at
    # A zip64 end record, located just before the plain one, holds the true
    # values (torch.save writes one always; aiostage where sizes need it).
    locator_at = eocd_at - _ZIP64_LOCATOR.size
    locator = os.pread(fd, _ZIP64_LOCATOR.size, locator_at) if locator_at >= 0 else b""
    if len(locator) == _ZIP64_LOCATOR.size and locator[:4] == _ZIP64_LOCATOR_SIG:
        _, _, record_at, _ = _ZIP64_LOCATOR.unpack(locator)
        if record_at + _ZIP64_EOCD.size > locator_at:
            raise ZipDirectoryError("bad zip64 end of central directory locator")
        record = os.pread(fd, _ZIP64_EOCD.size, record_at)
        if len(record) < _ZIP64_EOCD.size:
            raise ZipDirectoryError("zip64 end record truncated")
        sig, _, _, _, disk, cd_disk, on_disk, entries, cd_size, cd_offset = _ZIP64_EOCD.unpack(
            record
        )
        if sig != _ZIP64_EOCD_SIG:
            raise ZipDirectoryError("bad zip64 end of central directory record")
        end = record_at
    elif _U16_MAX in (entries, on_disk) or _U32_MAX in (cd_size, cd_offset):
        raise ZipDirectoryError("zip64 end of central directory locator missing")
    if disk or cd_disk or on_disk != entries:
        raise ZipDirectoryError("multi-disk archives are not checkpoints")
    if cd_offset + cd_size != end:
        raise ZipDirectoryError("the central directory does not end where the end record begins")
    return entries, cd_offset, cd_size


def read_directory(fd: int, size: int) -> list[CentralEntry]:
    """Every entry of the central directory of the archive open as ``fd``
    (``size`` bytes long; blocking: for a worker thread).

    Raises:
        ZipDirectoryError: the end records or the directory do not parse.
        OSError: the file cannot be read.
    """
    count, cd_offset, cd_size = _end_records(fd, size)
    data = os.pread(fd, cd_size, cd_offset)
    if len(data) != cd_size:
        raise ZipDirectoryError("central directory truncated")
    out: list[CentralEntry] = []
    turn = GilTurns()
    pos = 0
    unpack = _CENTRAL.unpack_from
    for _ in range(count):
        turn()
        if pos + _CENTRAL.size > cd_size:
            raise ZipDirectoryError("central directory shorter than its entry count")
        (
            sig,
            _,
            _,
            flags,
            method,
            _,
            _,
            crc,
            csize,
            usize,
            name_len,
            extra_len,
            comment_len,
            _,
            _,
            external,
            offset,
        ) = unpack(data, pos)
        if sig != _CENTRAL_SIG:
            raise ZipDirectoryError("bad central directory entry signature")
        start = pos + _CENTRAL.size
        pos = start + name_len + extra_len + comment_len
        if pos > cd_size:
            raise ZipDirectoryError("a central directory entry runs past the directory")
        raw_name = data[start : start + name_len]
        if _U32_MAX in (usize, csize, offset):
            extra = data[start + name_len : start + name_len + extra_len]
            wide = widen((usize, csize, offset), extra)
            if wide is None:
                raise ZipDirectoryError("zip64 sizes or offset missing from the extra field")
            usize, csize, offset = wide
        try:
            name = raw_name.decode("utf-8" if flags & _UTF8_FLAG else "cp437")
        except UnicodeDecodeError as exc:
            raise ZipDirectoryError(f"record name is not valid UTF-8 ({exc})") from exc
        cut = name.split("\x00", 1)[0]
        out.append(
            CentralEntry(cut, name, raw_name, flags, method, crc, csize, usize, offset, external)
        )
    if pos != cd_size:
        raise ZipDirectoryError("central directory longer than its entry count")
    return out
