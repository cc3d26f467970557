"""Traverse: a deep copy of any Python object whose tensors become CPU tensors.

The traversal follows the rules of :func:`copy.deepcopy` (a memo so that
shared and recursive structures are copied once; ``__deepcopy__``; the
``copyreg`` table; ``__reduce_ex__(4)`` reconstruction), with fast paths for
the containers state dicts are made of.  It does not copy tensor bytes: for
each tensor it asks the engine for the destination storage of the tensor's
source storage (``storage_for``) and builds a CPU tensor over it with the same
dtype, offset, size and stride.  The bytes are moved later by a copier.

The traversal is a generator so that one implementation serves two drivers:
the blocking engine runs it straight through, and the async stagers run it on
the event loop in slices of a time budget, yielding to the loop in between.
"""

from __future__ import annotations

import copy
import copyreg
import sys
import time
import types
import weakref
from collections.abc import Callable, Generator
from typing import Any

import torch

from aiostage._exceptions import StagingError

__all__ = ["ROOT", "Traversal", "check_stageable", "format_path", "stageable", "view_on"]

Path = tuple[Any, ...]
"""A key path as a linked list ``(parent, key)``; built cheaply, formatted on demand."""

ROOT: Path = ()

_MISSING = object()

_ATOMIC: frozenset[type] = frozenset(
    {
        type(None),
        type(Ellipsis),
        type(NotImplemented),
        int,
        float,
        bool,
        complex,
        bytes,
        str,
        range,
        types.CodeType,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.ModuleType,
        weakref.ref,
        property,
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
        torch.qscheme,
    }
)

_PLAIN_TENSORS: frozenset[type] = frozenset({torch.Tensor, torch.nn.Parameter})

_TYPE_CHECK_CONTAINERS = (dict, list, tuple)

StageTensor = Callable[[torch.Tensor, Path], torch.Tensor]


def format_path(path: Path) -> str:
    """``(((), 'optimizer'), 'state'), 3)`` -> ``'optimizer.state.3'``."""
    parts: list[str] = []
    while path:
        path, key = path
        parts.append(str(key))
    return ".".join(reversed(parts)) if parts else "<root>"


def _loaded_type(module: str, name: str) -> type | None:
    """``module.name`` if that module is already imported, else ``None``.

    A DTensor or ShardedTensor can only exist if its module was imported, so
    there is no need to pay for importing torch.distributed here.
    """
    mod = sys.modules.get(module)
    found = getattr(mod, name, None) if mod is not None else None
    return found if isinstance(found, type) else None


def stageable(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor whose bytes can be staged (strided, with data)."""
    return not (t.layout is not torch.strided or t.is_quantized or t.is_nested or t.is_meta)


def check_stageable(t: torch.Tensor, path: Path) -> torch.UntypedStorage:
    """Return ``t``'s untyped storage, or raise a StagingError saying why not."""
    if not stageable(t):
        if t.is_meta:
            reason = "a tensor on the meta device: it holds no data"
        elif t.is_quantized or t.is_nested:
            reason = "quantized or nested tensors"
        else:
            reason = f"a tensor with layout {t.layout}; only strided tensors are supported"
        raise StagingError(f"cannot stage {reason}", path=format_path(path))
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError) as exc:
        raise StagingError(f"tensor has no storage to copy: {exc}", path=format_path(path)) from exc


def view_on(t: torch.Tensor, dst: torch.UntypedStorage) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``t``'s staged copy over ``dst``: same dtype, offset, size, stride.

    Returns ``(plain, staged)``: ``plain`` is the bare CPU view (what copies
    write into); ``staged`` adds ``t``'s conjugate/negative bits, its
    ``nn.Parameter`` type and ``requires_grad``.
    """
    plain = torch.empty((0,), dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
    y = plain
    if t.is_conj():
        y = y.conj()
    if t.is_neg():
        y = y._neg_view()
    if type(t) is not torch.Tensor:
        y = torch.nn.Parameter(y, requires_grad=t.requires_grad)
    elif t.requires_grad:
        y = y.detach().requires_grad_(True)
    return plain, y


class Traversal:
    """One deep copy.  Not reusable: make one per stage call.

    Args:
        stage_tensor: returns the staged copy of a plain (``torch.Tensor`` or
            ``nn.Parameter``) source tensor: a CPU tensor over the staging
            storage the engine picked (see :func:`view_on`).
        type_check: refuse leaves that are not tensors, atomic values, dicts,
            lists or tuples (for :class:`BlockingAsyncStager`'s ``type_check``).
        budget_s: when set, the generator yields after roughly this many
            seconds of work so the event loop can run.
    """

    def __init__(
        self,
        stage_tensor: StageTensor,
        *,
        type_check: bool = False,
        budget_s: float | None = None,
    ) -> None:
        self._stage_tensor = stage_tensor
        self._type_check = type_check
        self._budget_s = budget_s
        self._memo: dict[int, Any] = {}
        self._keepalive: list[Any] = []
        self._memo[id(self._memo)] = self._keepalive
        self._ticks = 0
        self._deadline = float("inf")
        self._dtensor = _loaded_type("torch.distributed.tensor", "DTensor")
        self._sharded = _loaded_type("torch.distributed._shard.sharded_tensor.api", "ShardedTensor")

    # -- driving --------------------------------------------------------------

    def run(self, obj: Any) -> Generator[None, None, Any]:
        """Copy ``obj``; yields (only when a budget is set) to let a loop run."""
        self._restart_clock()
        return (yield from self._copy(obj, ROOT))

    def _restart_clock(self) -> None:
        if self._budget_s is not None:
            self._deadline = time.perf_counter() + self._budget_s

    def _tick(self) -> bool:
        """Count one unit of work; True when the time slice is used up."""
        self._ticks += 1
        if self._ticks < 32:
            return False
        self._ticks = 0
        return time.perf_counter() >= self._deadline

    def _pause(self) -> Generator[None, None, None]:
        yield
        self._restart_clock()

    # -- dispatch -------------------------------------------------------------

    def _copy(self, x: Any, path: Path) -> Generator[None, None, Any]:
        cls = type(x)
        if cls in _ATOMIC:
            return x
        found = self._memo.get(id(x), _MISSING)
        if found is not _MISSING:
            return found
        if self._tick():
            yield from self._pause()
        if isinstance(x, torch.Tensor):
            return self.tensor(x, path)
        if cls is dict:
            return (yield from self._dict(x, path))
        if cls is list:
            return (yield from self._list(x, path))
        if cls is tuple or (issubclass(cls, tuple) and hasattr(cls, "_fields")):
            return (yield from self._tuple(x, path))
        if issubclass(cls, type):
            return x
        if self._type_check and not isinstance(x, _TYPE_CHECK_CONTAINERS):
            raise StagingError(
                f"type_check: cannot stage a leaf of type {cls.__module__}.{cls.__qualname__}; "
                "allowed are tensors, atomic values, dict, list and tuple",
                path=format_path(path),
            )
        try:
            return (yield from self._object(x, path))
        except StagingError:
            raise
        except Exception as exc:
            raise StagingError(
                f"cannot stage object of type {cls.__module__}.{cls.__qualname__}: {exc}",
                path=format_path(path),
            ) from exc

    def _remember(self, x: Any, y: Any) -> None:
        self._memo[id(x)] = y
        self._keepalive.append(x)

    def _dict(self, x: dict[Any, Any], path: Path) -> Generator[None, None, dict[Any, Any]]:
        y: dict[Any, Any] = {}
        self._remember(x, y)
        for key, value in x.items():
            vcls = type(value)
            if vcls in _ATOMIC:
                y[key] = value
            elif vcls in _PLAIN_TENSORS and id(value) not in self._memo:
                y[key] = self.tensor(value, (path, key))
                if self._tick():
                    yield from self._pause()
            else:
                y[key] = yield from self._copy(value, (path, key))
        return y

    def _list(self, x: list[Any], path: Path) -> Generator[None, None, list[Any]]:
        y: list[Any] = []
        self._remember(x, y)
        append = y.append
        for index, value in enumerate(x):
            vcls = type(value)
            if vcls in _ATOMIC:
                append(value)
            elif vcls in _PLAIN_TENSORS and id(value) not in self._memo:
                append(self.tensor(value, (path, index)))
                if self._tick():
                    yield from self._pause()
            else:
                append((yield from self._copy(value, (path, index))))
        return y

    def _tuple(self, x: tuple[Any, ...], path: Path) -> Generator[None, None, tuple[Any, ...]]:
        items = []
        for index, value in enumerate(x):
            items.append((yield from self._copy(value, (path, index))))
        # A recursive tuple may have been copied while copying its items.
        found = self._memo.get(id(x), _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[no-any-return]
        if all(a is b for a, b in zip(items, x, strict=True)):
            y = x
        elif type(x) is tuple:
            y = tuple(items)
        else:  # namedtuple
            y = type(x)(*items)
        self._remember(x, y)
        return y

    def _object(self, x: Any, path: Path) -> Generator[None, None, Any]:
        cls = type(x)
        if isinstance(x, types.MethodType):
            target = yield from self._copy(x.__self__, path)
            return types.MethodType(x.__func__, target)
        deep = getattr(x, "__deepcopy__", None)
        if deep is not None:
            y = deep(self._memo)
            self._remember(x, y)
            return y
        reductor = copyreg.dispatch_table.get(cls)
        if reductor is not None:
            rv = reductor(x)
        else:
            reduce_ex = getattr(x, "__reduce_ex__", None)
            if reduce_ex is None:
                raise TypeError("it defines neither __deepcopy__ nor __reduce_ex__")
            rv = reduce_ex(4)
        if isinstance(rv, str):
            return x
        return (yield from self._reconstruct(x, rv, path))

    def _reconstruct(self, x: Any, rv: tuple[Any, ...], path: Path) -> Generator[None, None, Any]:
        func, args, *rest = rv
        state = rest[0] if len(rest) > 0 else None
        listiter = rest[1] if len(rest) > 1 else None
        dictiter = rest[2] if len(rest) > 2 else None
        if args:
            args = yield from self._copy(args, path)
        y = func(*args)
        self._remember(x, y)
        if state is not None:
            if isinstance(state, tuple) and len(state) == 2:
                attrs, slots = state
            else:
                attrs, slots = state, None
            if hasattr(y, "__setstate__") and type(y).__setstate__ is not getattr(
                object, "__setstate__", None
            ):
                y.__setstate__((yield from self._copy(state, path)))
            else:
                if attrs:
                    copied = yield from self._copy_attrs(attrs, path)
                    y.__dict__.update(copied)
                if slots:
                    copied = yield from self._copy_attrs(slots, path)
                    for key, value in copied.items():
                        object.__setattr__(y, key, value)
        if listiter is not None:
            for index, item in enumerate(listiter):
                y.append((yield from self._copy(item, (path, index))))
        if dictiter is not None:
            for key, value in dictiter:
                y[(yield from self._copy(key, path))] = yield from self._copy(value, (path, key))
        return y

    def _copy_attrs(
        self, attrs: dict[str, Any], path: Path
    ) -> Generator[None, None, dict[str, Any]]:
        out = {}
        for key, value in attrs.items():
            out[key] = yield from self._copy(value, (path, key))
        return out

    # -- tensors --------------------------------------------------------------

    def tensor(self, t: torch.Tensor, path: Path) -> torch.Tensor:
        """Stage one tensor (memoised), keeping its type, flags and attributes."""
        found = self._memo.get(id(t), _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[no-any-return]
        cls = type(t)
        if cls in _PLAIN_TENSORS:
            y = self._plain_tensor(t, path)
        elif self._dtensor is not None and isinstance(t, self._dtensor):
            y = self._dtensor_copy(t, path)
        elif self._sharded is not None and isinstance(t, self._sharded):
            y = self._sharded_copy(t, path)
        elif issubclass(cls, torch.nn.Parameter):
            y = self._plain_tensor(t, path)
        else:
            raise StagingError(
                f"cannot stage a tensor subclass {cls.__module__}.{cls.__qualname__}; "
                "only torch.Tensor, nn.Parameter, DTensor and ShardedTensor are supported",
                path=format_path(path),
            )
        self._remember(t, y)
        extra = getattr(t, "__dict__", None)
        if extra:
            for key, value in extra.items():
                if key in y.__dict__:
                    continue
                gen = self._copy(value, (path, key))
                try:
                    while True:
                        next(gen)
                except StopIteration as stop:
                    setattr(y, key, stop.value)
        return y

    def _plain_tensor(self, t: torch.Tensor, path: Path) -> torch.Tensor:
        return self._stage_tensor(t, path)

    def _dtensor_copy(self, t: Any, path: Path) -> torch.Tensor:
        local = self._plain_tensor(t._local_tensor, (path, "_local_tensor"))
        dtensor_cls = type(t)
        return dtensor_cls(local, t._spec, requires_grad=t.requires_grad)  # type: ignore[no-any-return]

    def _sharded_copy(self, t: Any, path: Path) -> torch.Tensor:
        from torch.distributed._shard.sharded_tensor.api import ShardedTensor
        from torch.distributed._shard.sharded_tensor.shard import Shard

        shards = [
            Shard(
                tensor=self._plain_tensor(shard.tensor, (path, f"shard{index}")),
                metadata=copy.deepcopy(shard.metadata),
            )
            for index, shard in enumerate(t.local_shards())
        ]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, copy.deepcopy(t.metadata()), process_group=t._process_group
        )
