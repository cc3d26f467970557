"""The state index: a record that lets a load rebuild the state without unpickling.

``data.pkl`` can only be read back by an unpickler, and torch's
``weights_only`` one is pure Python: about 55 us a tensor here, so 1.1-1.4 s
of a load of 20,000 small tensors, most of it on the critical path, and
11 ms of the 14-16 before a load ``into`` existing tensors reads its first
byte.
Most states are made of a few plain types only, so beside ``data.pkl`` the
writer puts ``<top>/.aiostage/index``, the same state as a program of a
small stack machine in JSON, which :func:`decode` runs in microseconds a
tensor.  It can describe nothing but

- ``None``, ``bool``, ``int``, ``float`` and ``str`` (exactly those types);
- ``dict``, ``collections.OrderedDict`` (with its attributes, such as a
  ``state_dict()``'s ``_metadata``, none named ``__...``), ``list`` and
  ``tuple`` (exactly), each met once (an object met twice keeps its
  identity only in the pickle), with dict keys of the scalar types above;
- plain CPU tensors: exactly ``torch.Tensor``, strided, not requiring grad,
  with no Python attributes, of a dtype with a legacy storage class (the
  tensors :func:`aiostage._persist._archive._plain_reduction` reduces), a
  tensor met twice rebuilt as one.

A state with anything else gets no index, and is loaded by unpickling.
Reading JSON runs no code, so the index needs no allow-list; it is only
trusted for the ``data.pkl`` it was written with (its CRC-32 is in the
index), and a load falls back to the unpickler when the index is missing,
stale or malformed: ``data.pkl`` stays the checkpoint's authority, and
``torch.load`` ignores the extra record.

Format (UTF-8 text): a header line, ``{"format": "aiostage-index",
"version": 1, "pickle_crc": <data.pkl's CRC-32>, "ops": <count>}``, then
the ops in postorder as JSON arrays of at most :data:`OPS_PER_LINE` ops a
line (so that no single ``json.loads`` call holds the GIL for long).  An op
is a JSON scalar (pushed as it is) or a list:

- ``["t", key, dtype, offset, sizes, strides]``: push a tensor viewing
  storage record ``data/<key>`` as ``dtype`` (``"float32"``);
- ``["r", i]``: push the ``i``-th tensor again;
- ``["l", n]`` / ``["u", n]``: pop ``n`` values, push them as a list / tuple;
- ``["d", n]``: pop ``n`` key, value pairs, push a dict (keys: scalars);
- ``["o", n, m]``: pop ``n`` key, value pairs and ``m`` attribute name,
  value pairs, push an ``OrderedDict``.

The program must leave exactly one value.
"""

from __future__ import annotations

import collections
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from aiostage._threads import GilTurns, free_all_in_blocks

__all__ = ["INDEX_NAME", "OPS_PER_LINE", "BadIndex", "decode", "encode"]

INDEX_NAME = ".aiostage/index"
"""The record's name under the archive's top folder."""

OPS_PER_LINE = 1024

_FORMAT = "aiostage-index"
_VERSION = 1
_SCALARS = (type(None), bool, int, float, str)
_MAX_DEPTH = 200


class BadIndex(Exception):
    """The index cannot describe the state (:func:`encode`), or does not
    hold together (:func:`decode`): use ``data.pkl``."""


def _dtypes() -> dict[str, torch.dtype]:
    v3 = frozenset(torch.storage._new_dtypes())
    out = {}
    for dtype in torch.storage._dtype_to_storage_type_map():
        if dtype not in v3:
            out[str(dtype).removeprefix("torch.")] = dtype
    return out


_DTYPES = _dtypes()
"""The dtypes an index may name, by name (those with a legacy storage class)."""


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class _Encoder:
    def __init__(self, plain: Mapping[int, tuple[Any, ...]]) -> None:
        self.plain = plain
        self.ops: list[Any] = []
        self.tensors: dict[int, int] = {}
        self.seen: set[int] = set()
        self.turn = GilTurns()

    def value(self, obj: Any, depth: int) -> None:
        cls = type(obj)
        if cls in _SCALARS:
            self.ops.append(obj)
            return
        if cls is torch.Tensor:
            self.tensor(obj)
            return
        if depth > _MAX_DEPTH:
            raise BadIndex("nested too deeply")
        if id(obj) in self.seen:
            raise BadIndex("a container met twice")
        self.seen.add(id(obj))
        if cls is list or cls is tuple:
            for item in obj:
                self.value(item, depth + 1)
            self.ops.append(["l" if cls is list else "u", len(obj)])
        elif cls is dict or cls is collections.OrderedDict:
            for key, item in obj.items():
                if type(key) not in _SCALARS:
                    raise BadIndex(f"a {type(key).__qualname__} dict key")
                self.ops.append(key)
                self.value(item, depth + 1)
            if cls is dict:
                self.ops.append(["d", len(obj)])
                return
            attrs = vars(obj)
            for name, item in attrs.items():
                if name.startswith("__"):
                    raise BadIndex(f"attribute {name!r}")
                self.ops.append(name)
                self.value(item, depth + 1)
            self.ops.append(["o", len(obj), len(attrs)])
        else:
            raise BadIndex(f"a {cls.__qualname__}")

    def tensor(self, t: torch.Tensor) -> None:
        self.turn()
        again = self.tensors.get(id(t))
        if again is not None:
            self.ops.append(["r", again])
            return
        args = self.plain.get(id(t))
        if args is None:
            raise BadIndex("a tensor torch reduces itself")
        viewed, offset, size, stride = args[:4]
        name = _NAMES.get(viewed.dtype)
        if viewed.key is None or name is None:
            raise BadIndex("a tensor whose storage or dtype the index cannot name")
        self.tensors[id(t)] = len(self.tensors)
        self.ops.append(("t", viewed.key, name, offset, size, stride))  # (tuples: JSON arrays)


def encode(obj: Any, plain: Mapping[int, tuple[Any, ...]], pickled: bytes) -> bytes | None:
    """The index of ``obj`` (for a worker thread), or ``None`` where it
    cannot describe the state.

    From the pickling of ``obj`` into ``pickled`` (``data.pkl``): ``plain``
    holds the reduction arguments of each tensor pickled as a plain one, by
    ``id``; their storage (``aiostage._persist._archive._ViewedStorage``)
    carries its record key.
    """
    encoder = _Encoder(plain)
    try:
        encoder.value(obj, 0)
        lines = [
            json.dumps(
                {
                    "format": _FORMAT,
                    "version": _VERSION,
                    "pickle_crc": zlib.crc32(pickled),
                    "ops": len(encoder.ops),
                }
            )
        ]
        ops = encoder.ops
        for at in range(0, len(ops), OPS_PER_LINE):
            encoder.turn()
            lines.append(json.dumps(ops[at : at + OPS_PER_LINE]))
    except (BadIndex, ValueError, RecursionError):
        # (ValueError: an int too long for str(), see sys.set_int_max_str_digits)
        return None
    finally:
        # A tuple per tensor, and an int: freed in one call when this
        # returned, those of 20,000 tensors held the GIL 5-7 ms.
        free_all_in_blocks(encoder.ops, encoder.tensors)
    return "\n".join(lines).encode()


def _header(first: bytes) -> dict[str, Any]:
    """The index's first line, checked for format and version."""
    try:
        head = json.loads(first)
    except ValueError as exc:
        raise BadIndex("unreadable header") from exc
    if (
        not isinstance(head, dict)
        or head.get("format") != _FORMAT
        or head.get("version") != _VERSION
        or type(head.get("pickle_crc")) is not int
        or type(head.get("ops")) is not int
    ):
        raise BadIndex("not an index this aiostage reads")
    return head


def _ops(lines: list[bytes], count: int, turn: GilTurns) -> Iterator[Any]:
    seen = 0
    for line in lines:
        turn()
        try:
            chunk = json.loads(line)
        except ValueError as exc:
            raise BadIndex("unreadable ops") from exc
        if type(chunk) is not list:
            raise BadIndex("unreadable ops")
        seen += len(chunk)
        yield from chunk
    if seen != count:
        raise BadIndex(f"{seen} ops, the header says {count}")


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise BadIndex(f"{value!r} where an int >= 0 belongs")
    return value


def _pop(stack: list[Any], n: int) -> list[Any]:
    if n > len(stack):
        raise BadIndex("an op takes more values than the stack holds")
    if n == 0:
        return []
    items = stack[-n:]
    del stack[-n:]
    return items


def _pairs(items: list[Any], turn: GilTurns) -> Iterator[tuple[Any, Any]]:
    # (A GIL turn each: the dict of a flat state of 20,000 tensors is built
    # by one op, which held the GIL for 6-7 ms.)
    for key, value in zip(items[::2], items[1::2], strict=True):
        turn()
        if type(key) not in _SCALARS:
            raise BadIndex("a dict key that is not a scalar")
        yield key, value


def decode(
    data: bytes,
    pickle_crc: int,
    sizes: Mapping[str, int],
    storage_for: Callable[[str, int], torch.UntypedStorage],
) -> Any:
    """Rebuild the state the index ``data`` describes (for a worker thread).

    ``pickle_crc`` is the CRC-32 of the archive's ``data.pkl`` (from its
    directory); ``sizes`` gives each storage record's byte count, and
    ``storage_for(key, nbytes)`` the storage of each key (called once per
    key, as for the unpickler).

    Raises:
        BadIndex: the index is stale (written for another ``data.pkl``),
            or malformed: nothing was built that the caller keeps.
    """
    first, *lines = data.split(b"\n")
    head = _header(first)
    if head["pickle_crc"] != pickle_crc:
        raise BadIndex("written for another data.pkl")
    turn = GilTurns()
    stack: list[Any] = []
    tensors: list[torch.Tensor] = []
    storages: dict[str, tuple[torch.UntypedStorage, torch.dtype]] = {}
    for op in _ops(lines, head["ops"], turn):
        if type(op) is not list:
            if type(op) not in _SCALARS:
                raise BadIndex("an op that is neither a scalar nor a list")
            stack.append(op)
            continue
        if not op or type(op[0]) is not str:
            raise BadIndex("an op without a name")
        name = op[0]
        if name == "t" and len(op) == 6:
            turn()
            tensors.append(_tensor(op, sizes, storages, storage_for))
            stack.append(tensors[-1])
        elif name == "r" and len(op) == 2:
            at = _int(op[1])
            if at >= len(tensors):
                raise BadIndex("a reference to a tensor not built yet")
            stack.append(tensors[at])
        elif name in ("l", "u") and len(op) == 2:
            items = _pop(stack, _int(op[1]))
            stack.append(items if name == "l" else tuple(items))
        elif name == "d" and len(op) == 2:
            stack.append(dict(_pairs(_pop(stack, 2 * _int(op[1])), turn)))
        elif name == "o" and len(op) == 3:
            attrs = _pop(stack, 2 * _int(op[2]))
            od = collections.OrderedDict(_pairs(_pop(stack, 2 * _int(op[1])), turn))
            for attr, value in _pairs(attrs, turn):
                if type(attr) is not str or attr.startswith("__"):
                    raise BadIndex(f"attribute name {attr!r}")
                od.__dict__[attr] = value
            stack.append(od)
        else:
            raise BadIndex(f"unknown op {name!r} of {len(op)} fields")
    if len(stack) != 1:
        raise BadIndex(f"the ops leave {len(stack)} values, not one")
    free_all_in_blocks(storages)  # (a tuple per storage: see encode)
    return stack[0]


def _tensor(
    op: list[Any],
    sizes: Mapping[str, int],
    storages: dict[str, tuple[torch.UntypedStorage, torch.dtype]],
    storage_for: Callable[[str, int], torch.UntypedStorage],
) -> torch.Tensor:
    # (One pass over the sizes and strides, no helper calls: 20,000 tensors
    # are decoded in a load of many small ones.)
    _, key, dtype_name, offset, shape, stride = op
    dtype = _DTYPES.get(dtype_name) if type(dtype_name) is str else None
    nbytes = sizes.get(key) if type(key) is str else None
    if dtype is None or nbytes is None:
        raise BadIndex(f"a tensor of dtype {dtype_name!r} in record {key!r}")
    if type(shape) is not list or type(stride) is not list or len(shape) != len(stride):
        raise BadIndex("a tensor's sizes and strides do not pair up")
    if type(offset) is not int or offset < 0:
        raise BadIndex(f"a tensor's offset is {offset!r}")
    last = offset
    empty = False
    for n, s in zip(shape, stride):  # noqa: B905 - lengths checked above
        if type(n) is not int or type(s) is not int or n < 0 or s < 0:
            raise BadIndex(f"a tensor's sizes {shape!r} and strides {stride!r}")
        if n == 0:
            empty = True
        else:
            last += (n - 1) * s
    itemsize = dtype.itemsize
    if nbytes % itemsize:
        raise BadIndex(f"record {key!r} is not a whole number of {dtype_name} items")
    if not empty and (last + 1) * itemsize > nbytes:  # (an empty tensor reads nothing)
        raise BadIndex(f"a tensor runs past the end of record {key!r}")
    have = storages.get(key)
    if have is None:
        storage = storage_for(key, nbytes)
        storages[key] = (storage, dtype)
    else:
        storage = have[0]
        if have[1] != dtype and nbytes:
            raise BadIndex(f"record {key!r} viewed as two dtypes")
    try:
        return torch.empty(0, dtype=dtype, device=storage.device).set_(
            storage, offset, shape, stride
        )
    except (RuntimeError, OverflowError, TypeError, ValueError) as exc:
        # (sizes whose product overflows, or numbers past int64)
        raise BadIndex(f"a tensor torch cannot view: {exc}") from exc
