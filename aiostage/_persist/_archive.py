"""The on-disk layout: a standard ``torch.save`` zip archive, planned up front.

A checkpoint is an uncompressed ("stored") zip archive holding the records
that ``torch.load`` expects under one top folder::

    <top>/data.pkl                 pickle of the state; storages are persistent ids
    <top>/.format_version          b"1"
    <top>/.storage_alignment       b"64"
    <top>/byteorder                b"little" / b"big"
    <top>/.aiostage/index          the state without pickle, where it can say
                                   (aiostage's own; torch.load ignores it)
    <top>/data/<key>               raw bytes of one storage, for every storage
    <top>/version                  b"3\\n"
    <top>/.data/serialization_id   40 decimal digits, random per file

Every record's data starts on a 64-byte boundary (the local header's extra
field is padded with a ``"FB"`` block, as ``torch.save`` does), so that
``torch.load(mmap=True)`` can map storages in place.  A large storage whose
memory is 64-byte aligned may be padded further, so that its file offset and
its address agree modulo :data:`DIRECT_ALIGN` (``StorageRecord.direct``):
then every whole file block of its bytes starts at an aligned address and can
be written with ``O_DIRECT`` straight from the storage (see
:mod:`aiostage._persist._writer`).  That costs at most 4 KiB per such record.

Because every size is known once the state is pickled (pickling needs only
metadata, never tensor bytes), every record's offset is computed before the
first byte is written.  The writer then lays down the metadata records, each
storage's bytes, and finally the central directory.  A local header carries
its record's CRC-32, so it is written just after that record's bytes, once
the CRC is known.

Only the standard library's ``struct`` and ``zlib`` are used; the layout is
checked against :mod:`zipfile` and ``torch.load`` by the tests.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import secrets
import struct
import sys
import types
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aiostage._persist import _index
from aiostage._threads import GilTurns, free_all_in_blocks

ALIGNMENT = 64
"""Data alignment of every record, as ``torch.save`` writes it."""

DIRECT_ALIGN = 4096
"""The file offset, address and length alignment of an ``O_DIRECT`` write
(a page: a multiple of every common logical block size)."""

_U32_MAX = 0xFFFFFFFF
_U16_MAX = 0xFFFF

_LOCAL_SIG = 0x04034B50
_CENTRAL_SIG = 0x02014B50
_EOCD_SIG = 0x06054B50
_ZIP64_EOCD_SIG = 0x06064B50
_ZIP64_LOCATOR_SIG = 0x07064B50

_LOCAL_FMT = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL_FMT = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD_FMT = struct.Struct("<IHHHHIIH")  # 22 bytes
_ZIP64_EOCD_FMT = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
_ZIP64_LOCATOR_FMT = struct.Struct("<IIQI")  # 20 bytes

_VERSION_PLAIN = 20
_VERSION_ZIP64 = 45
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: fixed, so files are reproducible
_DOS_TIME = 0
_PAD_ID = 0x4246  # "FB", the padding block torch.save uses
_ZIP64_ID = 0x0001

PICKLE_PROTOCOL = 2
"""The protocol ``torch.save`` uses; the ``weights_only`` unpickler expects it."""


class StateLayoutError(Exception):
    """The state cannot be written as a ``torch.save`` archive."""


class StatePickleError(Exception):
    """Pickling a state failed with ``cause``; ``key`` is the key path of the
    value at fault (see :func:`locate_failure`), when one was found."""

    def __init__(self, cause: Exception, key: str | None) -> None:
        super().__init__(cause, key)
        self.cause = cause
        self.key = key


@dataclass(eq=False, slots=True)
class StorageRecord:
    """One storage to write: its record name and where its bytes go."""

    key: str
    storage: torch.UntypedStorage
    nbytes: int
    name: str = ""
    header_offset: int = 0
    data_offset: int = 0
    zip64: bool = False
    crc: int = 0
    direct: bool = False
    """``data_offset`` is congruent to the storage's address modulo
    :data:`DIRECT_ALIGN`, so its whole blocks can be written with ``O_DIRECT``."""


@dataclass(eq=False, slots=True)
class Record:
    """A small record whose bytes are known up front (metadata, pickle)."""

    name: str
    data: bytes
    header_offset: int = 0
    data_offset: int = 0
    zip64: bool = False
    crc: int = 0


@dataclass(eq=False)
class ArchivePlan:
    """Every record's place in the file, computed before writing starts.

    ``head`` (offset 0) holds the pickle and the small metadata records,
    complete; each storage's bytes go at ``StorageRecord.data_offset`` with
    its local header (built by :func:`local_header`) at ``header_offset``;
    the tail (built by :meth:`tail_bytes` once every CRC is known) starts at
    ``tail_offset`` and ends the file.
    """

    head_records: list[Record]
    storages: list[StorageRecord]
    tail_records: list[Record]
    tail_offset: int
    force_zip64: bool
    payload_bytes: int
    head: bytes = b""

    def tail_bytes(self) -> bytes:
        """The trailing records, the central directory and the end records
        (for a worker thread: it hands the GIL over now and then)."""
        turn = GilTurns()
        out = bytearray()
        for rec in self.tail_records:
            out += _local_header_for(
                rec.name, len(rec.data), rec.crc, rec.zip64, rec.header_offset, rec.data_offset
            )
            out += rec.data
        central_offset = self.tail_offset + len(out)
        # (No tuple per record: 20,000 of them set off young collections of
        # the writer's own records, and then a full one.)
        central = bytearray()
        for r in self.head_records:
            central += _central_header(r.name, len(r.data), r.crc, r.header_offset, r.zip64)
        for s in self.storages:
            central += _central_header(s.name, s.nbytes, s.crc, s.header_offset, s.zip64)
            turn()
        for r in self.tail_records:
            central += _central_header(r.name, len(r.data), r.crc, r.header_offset, r.zip64)
        out += central
        out += _end_records(
            len(self.head_records) + len(self.storages) + len(self.tail_records),
            len(central),
            central_offset,
            central_offset + len(central),
            self.force_zip64,
        )
        return bytes(out)


# --- pickling ---------------------------------------------------------------


_NOT_STORAGES: frozenset[type] = frozenset(
    {int, float, bool, str, bytes, type(None), tuple, list, dict, torch.Size, torch.Tensor}
    | {torch.nn.Parameter, torch.dtype, torch.device, collections.OrderedDict}
    | {type, type(torch.FloatStorage), types.FunctionType, types.BuiltinFunctionType}
)
"""Types the pickler meets most (a tensor's reduction is made of them) that
are never storages."""


class _ViewedStorage:
    """A tensor's storage as the tensor's dtype sees it: what torch's own
    reduction wraps in a ``TypedStorage``, for :meth:`_StatePickler.persistent_id`,
    which sets ``key`` (the storage's record key, for the state index)."""

    __slots__ = ("dtype", "key", "storage")

    def __init__(self, storage: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.storage = storage
        self.dtype = dtype
        self.key: str | None = None


_V3_DTYPES = frozenset(torch.storage._new_dtypes())
"""Dtypes torch reduces to ``_rebuild_tensor_v3`` (no legacy storage class)."""


@functools.cache
def _storage_class(dtype: torch.dtype) -> Any:
    """The legacy storage class torch's pickles name for ``dtype`` (``torch.FloatStorage``)."""
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


def _plain_reduction(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What ``t.__reduce_ex__(2)`` returns, built without torch's Python
    reduction (25 us a tensor), for the tensors most states are made of:
    exactly ``torch.Tensor``, strided, on the CPU, no attributes, not
    requiring grad, no conjugate or negative bit, a dtype with a legacy
    storage class.  ``None`` for any other: torch reduces it.

    The pickle is byte for byte torch's (a test compares them, and
    :func:`_torch_reduces_alike` checks this torch once per process)."""
    if (
        t.layout is not torch.strided
        or t.device.type != "cpu"
        or t.requires_grad
        or t.is_quantized
        or t.is_nested
        or t.dtype in _V3_DTYPES
        or t.__dict__
        or torch._utils.get_tensor_metadata(t)
    ):
        return None
    args: tuple[Any, ...] = (
        _ViewedStorage(t.untyped_storage(), t.dtype),
        t.storage_offset(),
        tuple(t.size()),
        t.stride(),
        False,
        collections.OrderedDict(),
    )
    return (torch._utils._rebuild_tensor_v2, args)


@functools.cache
def _torch_reduces_alike() -> bool:
    """Whether this torch reduces a plain tensor as :func:`_plain_reduction`
    does (torch's reduction is not a public interface): compared once, on a
    view with an offset and strides; where it differs torch reduces every
    tensor itself."""
    sample = torch.arange(12.0).view(3, 4)[1:, ::2]
    try:
        func, args = sample.__reduce_ex__(PICKLE_PROTOCOL)
        storage = args[0]
        return (
            func is torch._utils._rebuild_tensor_v2
            and len(args) == 6
            and isinstance(storage, torch.storage.TypedStorage)
            and storage.dtype is sample.dtype
            and storage._untyped_storage.data_ptr() == sample.untyped_storage().data_ptr()
            and args[1:5] == (4, (2, 2), (4, 2), False)
            and type(args[5]) is collections.OrderedDict
            and not args[5]
        )
    except Exception:
        return False


class _StatePickler(pickle.Pickler):
    """Pickles a state the way ``torch.save`` does.

    Tensors reduce to ``torch._utils._rebuild_tensor_v2`` and friends, which
    the ``weights_only`` unpickler accepts: plain ones here
    (:func:`_plain_reduction`), the rest through their own
    ``__reduce_ex__``.  Every storage becomes the persistent id
    ``("storage", <torch.XStorage>, key, "cpu", numel)`` and is recorded
    once, however many tensors view it.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self.records: list[StorageRecord] = []
        self._keys: dict[int, str] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        # torch's tensor reduction is Python, 25 us a tensor: let the event
        # loop have the GIL (checked at each storage, and every 64 other
        # objects).
        self._turn = GilTurns()
        self._others = 0
        self.plain: dict[int, tuple[Any, ...]] = {}
        """Each plain tensor's reduction arguments, by ``id``: what the
        state index says of it (see :mod:`aiostage._persist._index`), kept
        alive past the pickle's memo (see :func:`pickle_state`)."""
        self._plain = _torch_reduces_alike()

    def reducer_override(self, obj: Any) -> Any:
        # Called for every object but the builtin types' (6 a tensor).
        if self._plain and type(obj) is torch.Tensor:
            reduced = _plain_reduction(obj)
            if reduced is not None:
                self.plain[id(obj)] = reduced[1]
                return reduced
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled (19 a tensor): the common ones
        # first, at the cost of a set lookup.
        cls = type(obj)
        if cls in _NOT_STORAGES:
            self._others += 1
            if not self._others & 63:
                self._turn()
            return None
        self._turn()
        if cls is _ViewedStorage:
            storage = obj.storage
            dtype = obj.dtype
            storage_type: Any = _storage_class(dtype)
            numel = storage.nbytes() // dtype.itemsize
        elif isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            dtype = obj.dtype
            storage_type = getattr(torch, obj._pickle_storage_type())
            numel = obj._size()
        elif isinstance(obj, torch.UntypedStorage):
            storage = obj
            dtype = torch.uint8
            storage_type = torch.UntypedStorage
            numel = obj.nbytes()
        else:
            return None
        if storage.device.type != "cpu":
            raise StateLayoutError(
                f"a storage lives on {storage.device}; persist writes staged CPU state only"
            )
        ident = storage._cdata
        seen = self._dtypes.setdefault(ident, dtype)
        if seen != dtype and storage.nbytes() > 0:
            raise StateLayoutError(
                "two tensors view the same storage as different dtypes "
                f"({seen} and {dtype}); torch.load cannot rebuild that"
            )
        key = self._keys.get(ident)
        if key is None:
            key = str(len(self._keys))
            self._keys[ident] = key
            self.records.append(StorageRecord(key=key, storage=storage, nbytes=storage.nbytes()))
        if cls is _ViewedStorage:
            obj.key = key
        return ("storage", storage_type, key, "cpu", numel)


def pickle_state(obj: object) -> tuple[bytes, list[StorageRecord], bytes | None]:
    """Pickle ``obj``; return the pickle, its storages in key order, and
    the state index (``None`` where the state is not made of the plain
    types the index describes; see :mod:`aiostage._persist._index`).

    Reads only metadata, never a storage's bytes, so it may run while the
    storages are still being filled.  For a worker thread: it hands the GIL
    over every millisecond (see :class:`aiostage._threads.GilTurns`).
    """
    buf = io.BytesIO()
    pickler = _StatePickler(buf)
    pickler.dump(obj)
    pickled = buf.getvalue()
    index = _index.encode(obj, pickler.plain, pickled)
    # The memo holds every object the pickle was made of; clearing it freed
    # the reductions made for the pickle (a tuple, the sizes, the strides,
    # an OrderedDict: 20,000 tensors, 16-17 ms) in one call, holding the
    # GIL.  They are kept past it (4 ms) and freed a block at a time.
    pickler.clear_memo()
    free_all_in_blocks(pickler.plain)
    return pickled, pickler.records, index


class _Discard:
    """A file that forgets what is written to it."""

    def write(self, data: bytes) -> int:
        return len(data)


_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)


def _parts(value: object) -> Iterator[tuple[str, object]]:
    """The named parts of ``value`` that its pickle is made of, as far as
    they can be named: items, elements, attributes."""
    if isinstance(value, dict):
        yield from ((str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        yield from ((str(i), v) for i, v in enumerate(value))
    elif not isinstance(value, _OPAQUE):
        attrs = getattr(value, "__dict__", None)
        if isinstance(attrs, dict):
            yield from ((str(k), v) for k, v in attrs.items())


def locate_failure(obj: object) -> str | None:
    """The key path (``"optim.state.3.exp_avg"``, ``"<root>"``) of the value
    that keeps ``obj`` from pickling, for an error message; ``None`` where
    ``obj`` pickles after all.

    Only run once :func:`pickle_state` has failed (worker thread).  Pickles
    the parts of each failing value one at a time, into nothing, and goes
    down into the first that fails, through dicts, lists, tuples and
    objects' attributes; a value none of whose parts fails alone is the one
    at fault.  One pickler serves all, so storages stay persistent ids (no
    tensor's bytes are read) and a storage viewed as two dtypes fails at the
    second view.
    """
    pickler = _StatePickler(_Discard())  # type: ignore[arg-type]

    def fails(value: object) -> bool:
        pickler.clear_memo()
        try:
            pickler.dump(value)
        except Exception:
            return True
        return False

    try:
        if not fails(obj):
            return None
        path: list[str] = []
        value = obj
        while True:
            for key, part in _parts(value):
                if fails(part):
                    path.append(key)
                    value = part
                    break
            else:
                return ".".join(path) or "<root>"
    except RecursionError:
        return None


# --- layout -------------------------------------------------------------------


def _data_offset(after: int, modulus: int = ALIGNMENT, residue: int = 0) -> int:
    """The first offset at or past ``after`` plus an ``FB`` block's 4-byte
    header that is ``residue`` modulo ``modulus``: where a record's data
    starts when its fixed local header ends at ``after``."""
    return after + 4 + (residue - (after + 4)) % modulus


def _padding(after: int, data_offset: int) -> bytes:
    """The ``FB`` extra block that fills ``[after, data_offset)``."""
    need = data_offset - after - 4
    if need < 0 or need > _U16_MAX - 24:  # pragma: no cover - guarded by _data_offset
        raise ValueError(f"cannot pad {data_offset - after} bytes in a local header")
    return struct.pack("<HH", _PAD_ID, need) + b"Z" * need


def _local_fixed_len(name: str, zip64: bool) -> int:
    return _LOCAL_FMT.size + len(name.encode()) + (20 if zip64 else 0)


def _local_header_for(
    name: str, size: int, crc: int, zip64: bool, header_offset: int, data_offset: int
) -> bytes:
    raw = name.encode()
    extra = b""
    if zip64:
        extra = struct.pack("<HHQQ", _ZIP64_ID, 16, size, size)
        stored = _U32_MAX
    else:
        stored = size
    extra += _padding(header_offset + _LOCAL_FMT.size + len(raw) + len(extra), data_offset)
    head = _LOCAL_FMT.pack(
        _LOCAL_SIG,
        _VERSION_ZIP64 if zip64 else _VERSION_PLAIN,
        0,  # flags: sizes and CRC are in this header, no data descriptor
        0,  # stored, not compressed
        _DOS_TIME,
        _DOS_DATE,
        crc,
        stored,
        stored,
        len(raw),
        len(extra),
    )
    return head + raw + extra


def local_header(rec: StorageRecord) -> bytes:
    """The local header of a storage record, once its CRC is known."""
    return _local_header_for(
        rec.name, rec.nbytes, rec.crc, rec.zip64, rec.header_offset, rec.data_offset
    )


def _central_header(name: str, size: int, crc: int, offset: int, zip64: bool) -> bytes:
    raw = name.encode()
    extra = b""
    size_field = size
    offset_field = offset
    if zip64:
        # Every field that overflows (or all of them, when forced) moves to
        # the zip64 extra block, in the order the format prescribes.
        extra = struct.pack("<HHQQQ", _ZIP64_ID, 24, size, size, offset)
        size_field = _U32_MAX
        offset_field = _U32_MAX
    return (
        _CENTRAL_FMT.pack(
            _CENTRAL_SIG,
            _VERSION_ZIP64 if zip64 else _VERSION_PLAIN,  # made by: MS-DOS, spec version
            _VERSION_ZIP64 if zip64 else _VERSION_PLAIN,
            0,
            0,
            _DOS_TIME,
            _DOS_DATE,
            crc,
            size_field,
            size_field,
            len(raw),
            len(extra),
            0,  # comment length
            0,  # disk number
            0,  # internal attributes
            0,  # external attributes
            offset_field,
        )
        + raw
        + extra
    )


def _end_records(
    count: int, central_size: int, central_offset: int, zip64_eocd_offset: int, force: bool
) -> bytes:
    zip64 = force or count >= _U16_MAX or central_size >= _U32_MAX or central_offset >= _U32_MAX
    out = b""
    if zip64:
        out += _ZIP64_EOCD_FMT.pack(
            _ZIP64_EOCD_SIG,
            _ZIP64_EOCD_FMT.size - 12,
            _VERSION_ZIP64,
            _VERSION_ZIP64,
            0,
            0,
            count,
            count,
            central_size,
            central_offset,
        )
        out += _ZIP64_LOCATOR_FMT.pack(_ZIP64_LOCATOR_SIG, 0, zip64_eocd_offset, 1)
        count16 = _U16_MAX
        size32 = _U32_MAX
        offset32 = _U32_MAX
    else:
        count16, size32, offset32 = count, central_size, central_offset
    out += _EOCD_FMT.pack(_EOCD_SIG, 0, 0, count16, count16, size32, offset32, 0)
    return out


def _needs_zip64(offset: int, size: int, force: bool) -> bool:
    return force or offset >= _U32_MAX or size >= _U32_MAX


def plan_archive(
    pickled: bytes,
    storages: Sequence[StorageRecord],
    index: bytes | None = None,
    *,
    top: str = "archive",
    force_zip64: bool = False,
    direct_min: int | None = None,
) -> ArchivePlan:
    """Lay out every record of the archive; fill in offsets and the head bytes.

    ``index``, when given, is written as ``<top>/.aiostage/index`` (see
    :mod:`aiostage._persist._index`).  With ``direct_min``, each storage of
    at least that many bytes whose memory is :data:`ALIGNMENT`-aligned is
    placed for ``O_DIRECT`` writes (``StorageRecord.direct``); it must not
    move before it is written.
    """
    serialization_id = "".join(str(secrets.randbelow(10)) for _ in range(40))
    head_records = [
        Record(f"{top}/data.pkl", pickled),
        Record(f"{top}/.format_version", b"1"),
        Record(f"{top}/.storage_alignment", str(ALIGNMENT).encode()),
        Record(f"{top}/byteorder", sys.byteorder.encode()),
    ]
    if index is not None:
        head_records.append(Record(f"{top}/{_index.INDEX_NAME}", index))
    tail_records = [
        Record(f"{top}/version", b"3\n"),
        Record(f"{top}/.data/serialization_id", serialization_id.encode()),
    ]
    offset = 0
    head = bytearray()
    for rec in head_records:
        rec.header_offset = offset
        rec.zip64 = _needs_zip64(offset, len(rec.data), force_zip64)
        rec.crc = _crc(rec.data)
        rec.data_offset = _data_offset(offset + _local_fixed_len(rec.name, rec.zip64))
        head += _local_header_for(
            rec.name, len(rec.data), rec.crc, rec.zip64, offset, rec.data_offset
        )
        head += rec.data
        offset = rec.data_offset + len(rec.data)
    payload = len(pickled)
    planned = list(storages)
    turn = GilTurns()
    for s in planned:
        turn()
        s.name = f"{top}/data/{s.key}"
        s.header_offset = offset
        s.zip64 = _needs_zip64(offset, s.nbytes, force_zip64)
        fixed = offset + _local_fixed_len(s.name, s.zip64)
        s.direct = (
            direct_min is not None
            and s.nbytes >= direct_min
            and s.storage.data_ptr() % ALIGNMENT == 0
        )
        if s.direct:
            residue = s.storage.data_ptr() % DIRECT_ALIGN
            s.data_offset = _data_offset(fixed, DIRECT_ALIGN, residue)
        else:
            s.data_offset = _data_offset(fixed)
        offset = s.data_offset + s.nbytes
        payload += s.nbytes
    tail_offset = offset
    for rec in tail_records:
        rec.header_offset = offset
        rec.zip64 = _needs_zip64(offset, len(rec.data), force_zip64)
        rec.crc = _crc(rec.data)
        rec.data_offset = _data_offset(offset + _local_fixed_len(rec.name, rec.zip64))
        offset = rec.data_offset + len(rec.data)
    return ArchivePlan(
        head_records=head_records,
        storages=planned,
        tail_records=tail_records,
        tail_offset=tail_offset,
        force_zip64=force_zip64,
        payload_bytes=payload,
        head=bytes(head),
    )


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & _U32_MAX
