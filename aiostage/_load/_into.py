"""``load(path, into=state)``: read a checkpoint into tensors that already exist.

A restore usually ends by copying every loaded tensor into the model and the
optimizer, so a plain load costs the state's size in fresh memory (page
faults included) plus a second pass over it.  With ``into``, the checkpoint
is unpickled onto the ``meta`` device first (shapes, dtypes and views; no
data), its tensors are matched with ``into``'s by key path, and each record
is then read straight into the memory of the tensor that receives it.  A
record that does not map one-to-one onto a dense destination (a storage
shared by several views, a non-contiguous destination) is read into a
scratch storage and copied.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aiostage._exceptions import StateMismatchError
from aiostage._stage._traverse import Path, format_path
from aiostage._threads import GilTurns

__all__ = ["Placement", "copy_rest", "place"]

_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.Size,
    torch.layout,
    torch.memory_format,
)


@dataclass
class Placement:
    """Where each storage record of the checkpoint goes."""

    result: Any = None
    targets: dict[str, tuple[torch.UntypedStorage, int]] = field(default_factory=dict)
    """Records read in place: key -> (destination storage, byte offset)."""
    copies: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(record key, meta tensor, destination) for records read into scratch memory."""


class _Absent:
    """``into`` has nothing at this key path."""


_ABSENT = _Absent()


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


class _Matcher:
    def __init__(self, file: str) -> None:
        self.file = file
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.turn = GilTurns()  # pure Python in a worker thread: let the loop run

    def fail(self, message: str, where: Path) -> StateMismatchError:
        return StateMismatchError(message, key=format_path(where), path=self.file)

    def walk(self, loaded: Any, into: Any, where: Path) -> Any:
        if isinstance(loaded, torch.Tensor):
            return self.tensor(loaded, into, where)
        if type(loaded) in _LEAVES:
            return loaded
        if isinstance(loaded, dict):
            return self.mapping(loaded, into, where)
        if isinstance(loaded, (list, tuple)):
            return self.sequence(loaded, into, where)
        raise self.fail(
            f"load(into=...) fills dicts, lists and tuples of tensors; the checkpoint "
            f"holds a {type(loaded).__qualname__} here (load it without into)",
            where,
        )

    def tensor(self, loaded: torch.Tensor, into: Any, where: Path) -> torch.Tensor:
        self.turn()
        if type(loaded) not in (torch.Tensor, torch.nn.Parameter) or loaded.layout != torch.strided:
            raise self.fail(
                f"load(into=...) fills dense tensors; the checkpoint holds a "
                f"{type(loaded).__qualname__} ({loaded.layout}) here",
                where,
            )
        if into is _ABSENT:
            raise self.fail("the checkpoint has a tensor here and into has nothing", where)
        if not isinstance(into, torch.Tensor):
            raise self.fail(
                f"the checkpoint has a tensor here and into has a {type(into).__qualname__}",
                where,
            )
        if into.dtype != loaded.dtype or into.shape != loaded.shape:
            raise self.fail(
                f"the checkpoint has a {loaded.dtype} tensor of shape {tuple(loaded.shape)}, "
                f"into has {into.dtype} of shape {tuple(into.shape)}",
                where,
            )
        if into.device.type != "cpu" or into.layout != torch.strided:
            raise self.fail(
                f"into's tensor must be a dense CPU tensor (it is {into.layout} on {into.device})",
                where,
            )
        if any(n > 1 and s == 0 for n, s in zip(into.shape, into.stride(), strict=True)):
            raise self.fail(
                f"into's tensor has elements that share memory (strides {into.stride()}, "
                "an expand()ed tensor?): it cannot receive the checkpoint's values",
                where,
            )
        self.pairs.append((loaded, into))
        return into

    def mapping(self, loaded: dict[Any, Any], into: Any, where: Path) -> Any:
        if into is _ABSENT and not _holds_tensor(loaded):
            return loaded
        if not isinstance(into, Mapping):
            raise self.fail(
                f"the checkpoint has a dict here and into has {type(into).__qualname__}",
                where,
            )
        for key, value in into.items():
            if key not in loaded and _holds_tensor(value):
                raise self.fail("into has a tensor here that the checkpoint lacks", (where, key))
        out = {k: self.walk(v, into.get(k, _ABSENT), (where, k)) for k, v in loaded.items()}
        if not isinstance(loaded, OrderedDict):
            return out
        ordered = OrderedDict(out)
        ordered.__dict__.update(vars(loaded))  # (a state_dict()'s _metadata)
        return ordered

    def sequence(self, loaded: Sequence[Any], into: Any, where: Path) -> Any:
        if into is _ABSENT and not _holds_tensor(loaded):
            return loaded
        if not isinstance(into, (list, tuple)) or len(into) != len(loaded):
            what = (
                f"{len(into)} items" if isinstance(into, (list, tuple)) else type(into).__qualname__
            )
            raise self.fail(
                f"the checkpoint has a sequence of {len(loaded)} items here, into has {what}",
                where,
            )
        items = [
            self.walk(v, w, (where, i)) for i, (v, w) in enumerate(zip(loaded, into, strict=True))
        ]
        if isinstance(loaded, list):
            return items
        if hasattr(loaded, "_fields"):  # a namedtuple
            return type(loaded)(*items)
        return tuple(items)


def place(
    file: str | os.PathLike[str],
    loaded: Any,
    into: Any,
    keys: Mapping[int, str],
    sizes: Mapping[str, int],
) -> Placement:
    """Match the meta-device ``loaded`` state with ``into``; plan where each
    record goes (blocking; for a worker thread).

    ``keys`` maps each meta storage (``_cdata``) to its record key; ``sizes``
    gives each record's byte count.

    Raises:
        StateMismatchError: a tensor without a counterpart, or one of another
            shape or dtype; ``key`` names the key path.
    """
    matcher = _Matcher(os.fspath(file))
    result = matcher.walk(loaded, into, ())
    by_key: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for meta, dst in matcher.pairs:
        by_key.setdefault(keys[meta.untyped_storage()._cdata], []).append((meta, dst))
    placement = Placement(result=result)
    taken: set[int] = set()
    for key, pairs in by_key.items():
        meta, dst = pairs[0]
        direct = (
            len(pairs) == 1
            and meta.storage_offset() == 0
            and meta.is_contiguous()
            and dst.is_contiguous()
            and meta.numel() * meta.element_size() == sizes[key]
            and dst.numel() > 0
            and dst.data_ptr() not in taken  # the same tensor twice in into
        )
        if direct:
            taken.add(dst.data_ptr())
            offset = int(dst.storage_offset()) * dst.element_size()
            placement.targets[key] = (dst.untyped_storage(), offset)
        else:
            placement.copies.extend((key, m, d) for m, d in pairs)
    return placement


def copy_rest(
    copies: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    scratch: Mapping[str, torch.UntypedStorage],
) -> None:
    """Copy the records read into scratch storages into their destinations
    (blocking; for a worker thread)."""
    with torch.no_grad():
        for key, meta, dst in copies:
            src = torch.empty(0, dtype=meta.dtype).set_(
                scratch[key], meta.storage_offset(), meta.size(), meta.stride()
            )
            dst.copy_(src)
