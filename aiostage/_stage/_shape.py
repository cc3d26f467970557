"""Shape: the containers of a staged state, so that the next stage of a state
built the same way can skip the traversal.

A replay (see ``_engine._Replay``) checks a state's leaves, its tensors and
atomic values, against what the last plan recorded for them, and builds the
staged copy around the recorded staged tensors.  For that it needs the
leaves as one flat list, in the order the traversal visits them, and a way to
build the copy's containers around new leaves.  :class:`Shape` records both
from a successful traversal: the tree of dicts, lists and tuples the state is
made of, down to its leaves, as in ``{"model": model.state_dict(), "optim":
{"state": {0: {...}}, "param_groups": [...]}, "step": 3}``.

:meth:`Shape.flatten` walks a new state along the recorded tree and gives up
(returns None) at the first difference: a container of another exact type,
another length or other keys, an attribute other than an ``nn.Module`` state
dict's ``_metadata``, or one container reached twice (the traversal would
copy it once and share the copy).  Whether the leaves still match is the
engine's check.  :meth:`Shape.build` then makes the staged copy's containers,
bottom-up, around the staged leaves.

All three run in slices of a time budget (a :class:`TimeSlice`), as
generators that yield in between, so that a state of many small dicts (an
optimizer's per-parameter state) does not hold up an event loop.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Generator, Iterator
from typing import Any, NamedTuple

from aiostage._stage._traverse import _ATOMIC, _PLAIN_TENSORS, ROOT, Path

__all__ = ["Flat", "Shape", "TimeSlice", "copy_metadata"]

#: The containers a shape is made of (exact types: a subclass may copy itself
#: differently, and goes through the full traversal).
_KINDS = frozenset({dict, OrderedDict, list, tuple})
_DICTS = frozenset({dict, OrderedDict})
#: Check the clock every this many containers or leaves.
_TICK = 64
#: Fill a big container this many items at a time between clock checks.
_BLOCK = 1024

#: What :meth:`Shape.flatten` returns: the leaves in traversal order; per
#: node, a dict's keys, a tuple of atomic values itself, or None; and the
#: module metadata.
Flat = tuple[list[Any], list[Any], list[OrderedDict[str, dict[str, Any]]]]


class TimeSlice:
    """Tells a generator when its time slice is used up (``budget_s`` None:
    never); one is handed on from generator to generator, so that a slice
    ends on time across them."""

    __slots__ = ("budget_s", "deadline", "ticks")

    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.deadline = float("inf") if budget_s is None else time.perf_counter() + budget_s
        self.ticks = 0

    def due(self, work: int = 1) -> bool:
        self.ticks += work
        if self.ticks < _TICK:
            return False
        self.ticks = 0
        return time.perf_counter() >= self.deadline

    def over(self) -> bool:
        """Whether the slice is used up (asked after a block of work)."""
        return time.perf_counter() >= self.deadline

    def restart(self) -> None:
        self.deadline = time.perf_counter() + (self.budget_s or 0.0)


def copy_metadata(
    obj: Any, clock: TimeSlice
) -> Generator[None, None, OrderedDict[str, dict[str, Any]] | None]:
    """A copy of ``obj._metadata`` if that is ``obj``'s only attribute and
    it is what ``nn.Module.state_dict()`` attaches (an ``OrderedDict`` of
    dicts of atomic values); otherwise None (a replay does not apply).

    A generator that yields when ``clock``'s slice is used up: a large model
    has one entry per module.
    """
    attrs = obj.__dict__
    metadata = attrs.get("_metadata")
    if len(attrs) != 1 or type(metadata) is not OrderedDict:
        return None
    out: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for key, value in list(metadata.items()):
        if type(key) is not str or type(value) is not dict:
            return None
        if not all(type(v) in _ATOMIC for v in value.values()):
            return None
        out[key] = dict(value)
        if clock.due():
            yield
            clock.restart()
    return out


class _Node:
    """One container of a shape.

    Its items are leaves at positions ``start .. start + size`` of the flat
    list when ``start >= 0``; otherwise ``leaf_slots`` and ``node_slots``
    say, item by item, which leaf position or child node each one is.
    """

    __slots__ = (
        "frozen",
        "index",
        "keys",
        "kind",
        "leaf_slots",
        "meta",
        "node_slots",
        "path",
        "size",
        "start",
    )

    def __init__(self, index: int, kind: type, size: int, keys: list[Any] | None, path: Path):
        self.index = index  # numbered depth first, as the traversal visits them
        self.kind: type[Any] = kind
        self.size = size
        self.keys = keys  # a dict's keys, in order; None for a list or tuple
        self.path = path
        self.meta = -1  # where its module ``_metadata`` goes in Flat's list, or -1
        self.frozen = False  # a tuple of atomic values: the copy is the tuple itself
        self.start = -1
        self.leaf_slots: list[tuple[int, int]] = []  # (item, leaf position)
        self.node_slots: list[tuple[int, int]] = []  # (item, node index)


class _Row(NamedTuple):
    """A node as :meth:`Shape.flatten` and :meth:`Shape.build` read it.

    Rows are numbered breadth first, so that a node's child containers are
    consecutive rows (``first`` on) and move in and out as one slice.
    """

    kind: type[Any]
    size: int
    keys: list[Any] | None  # a dict's keys, in order
    meta: int  # where its module ``_metadata`` goes in Flat's list, or -1
    frozen: bool  # a tuple of atomic values: the copy is the tuple itself
    start: int  # only leaves, at positions start .. start + size; or -1:
    first: int  # the row of its first child container
    child_items: list[int]  # which items are child containers (rows first, ...)
    leaf_items: list[int]  # which items are leaves...
    leaf_positions: list[int]  # ...at these positions


def _compile(nodes: list[_Node], clock: TimeSlice) -> Generator[None, None, list[_Row]]:
    """The rows of ``nodes`` (numbered depth first), breadth first."""
    order = [nodes[0]]
    for node in order:  # (grows as it goes)
        order.extend(nodes[child] for _, child in node.node_slots)
        if clock.due():
            yield
            clock.restart()
    row_of = {node.index: row for row, node in enumerate(order)}
    rows = []
    for node in order:
        if clock.due():
            yield
            clock.restart()
        children = [item for item, _ in node.node_slots]
        first = row_of[node.node_slots[0][1]] if node.node_slots else 0
        rows.append(
            _Row(
                node.kind,
                node.size,
                node.keys,
                node.meta,
                node.frozen,
                node.start,
                first,
                children,
                [item for item, _ in node.leaf_slots],
                [position for _, position in node.leaf_slots],
            )
        )
    return rows


class Shape:
    """The containers of a state that was staged, from the root down to its
    leaves (see the module docstring).  Make one with :meth:`record`."""

    __slots__ = ("leaf_count", "meta_count", "rows")

    def __init__(self, rows: list[_Row], leaf_count: int, meta_count: int) -> None:
        self.rows = rows
        self.leaf_count = leaf_count
        self.meta_count = meta_count

    @classmethod
    def record(
        cls, obj: Any, result: Any, clock: TimeSlice
    ) -> Generator[None, None, tuple[Shape, list[Any], list[Any], list[Path]] | None]:
        """Walk ``obj`` and its staged copy ``result`` together.

        Returns the shape, the leaves of ``obj`` and of ``result`` (in the
        traversal's order) and each leaf's key path; or None when ``obj`` is
        not made only of the supported containers over tensors and atomic
        values, or reaches one container twice.
        """
        if type(obj) not in _KINDS:
            return None
        nodes: list[_Node] = []
        leaves_in: list[Any] = []
        leaves_out: list[Any] = []
        paths: list[Path] = []
        seen: set[int] = set()
        metas = 0

        def enter(
            x: Any, y: Any, path: Path
        ) -> Generator[None, None, tuple[_Node, Iterator[tuple[Any, Any, Any]]] | None]:
            nonlocal metas
            kind = type(x)
            if type(y) is not kind or id(x) in seen:
                return None
            meta = -1
            if getattr(x, "__dict__", None):
                if (yield from copy_metadata(x, clock)) is None:
                    return None
                meta, metas = metas, metas + 1
            # (No yield from here on: the caller's loop may change ``x``
            # while this generator waits, so take it all at once.)
            keys = None
            if kind in _DICTS:
                keys = list(x)
                if list(y) != keys:
                    return None
                xs, ys = list(x.values()), list(y.values())
            else:
                xs, ys = list(x), list(y)
            if len(ys) != len(xs):
                return None
            node = _Node(len(nodes), kind, len(xs), keys, path)
            node.meta = meta
            # A tuple of atomic values is its own copy (the traversal hands
            # out the same object), and may be shared: an optimizer's
            # param_groups share its default ``betas``.
            node.frozen = kind is tuple and all(type(v) in _ATOMIC for v in xs)
            if not node.frozen:
                seen.add(id(x))
            nodes.append(node)
            labels = keys if keys is not None else range(len(xs))
            return node, zip(labels, xs, ys, strict=True)

        root = yield from enter(obj, result, ROOT)
        if root is None:
            return None
        stack = [root]
        while stack:
            node, pending = stack[-1]
            done = len(node.leaf_slots) + len(node.node_slots)  # items before a descent
            for item, (key, x, y) in enumerate(pending, start=done):
                kind = type(x)
                if kind in _KINDS:
                    child = yield from enter(x, y, (node.path, key))
                    if child is None:
                        return None
                    node.node_slots.append((item, child[0].index))
                    stack.append(child)
                    break
                if kind not in _ATOMIC and kind not in _PLAIN_TENSORS:
                    return None
                node.leaf_slots.append((item, len(leaves_in)))
                leaves_in.append(x)
                leaves_out.append(y)
                paths.append((node.path, key))
                if clock.due():
                    yield
                    clock.restart()
            else:
                stack.pop()
                if not node.node_slots:  # only leaves: they are consecutive
                    node.start = node.leaf_slots[0][1] if node.leaf_slots else len(leaves_in)
                    node.leaf_slots = []
                if clock.due():
                    yield
                    clock.restart()
        rows = yield from _compile(nodes, clock)
        return cls(rows, len(leaves_in), metas), leaves_in, leaves_out, paths

    def flatten(self, obj: Any, clock: TimeSlice) -> Generator[None, None, Flat | None]:
        """The leaves of ``obj`` if it is built like the recorded state
        (see the module docstring), else None."""
        rows = self.rows
        leaves: list[Any] = [None] * self.leaf_count
        objs: list[Any] = [None] * len(rows)
        objs[0] = obj
        per_node: list[Any] = [None] * len(rows)
        metas: list[Any] = [None] * self.meta_count
        reached: set[int] = set()
        for index, row in enumerate(rows):  # parents before children
            kind, size, keys, meta, frozen, start, first, children, leaf_items, positions = row
            x = objs[index]
            if type(x) is not kind or len(x) != size:
                return None
            if not frozen:
                if id(x) in reached:
                    return None  # one container reached twice
                reached.add(id(x))
            if meta >= 0:
                metadata = yield from copy_metadata(x, clock)
                if metadata is None:
                    return None
                metas[meta] = metadata
            elif kind is OrderedDict and x.__dict__:
                return None
            # (No yield from here to the leaves: the caller's loop may
            # change ``x`` while this generator waits.)
            values: Any = x
            if keys is not None:
                now = list(x)
                if now != keys:
                    return None
                per_node[index] = now
                values = list(x.values())
                if len(values) != size:
                    return None
            elif frozen:
                per_node[index] = x
            if start >= 0:
                leaves[start : start + size] = values
            elif not leaf_items:
                objs[first : first + size] = values
            else:
                objs[first : first + len(children)] = map(values.__getitem__, children)
                for item, position in zip(leaf_items, positions, strict=True):
                    leaves[position] = values[item]
            if clock.due(1 + (size >> 4)):
                yield
                clock.restart()
        return leaves, per_node, metas

    def build(
        self,
        leaves: list[Any],
        per_node: list[Any],
        metas: list[OrderedDict[str, dict[str, Any]]],
        clock: TimeSlice,
    ) -> Generator[None, None, Any]:
        """The containers of the staged copy around ``leaves`` (in traversal
        order), from what :meth:`flatten` returned."""
        rows = self.rows
        built: list[Any] = [None] * len(rows)
        for index in range(len(rows) - 1, -1, -1):  # children before parents
            kind, size, keys, meta, frozen, start, first, children, leaf_items, positions = rows[
                index
            ]
            if frozen:
                built[index] = per_node[index]
                continue
            if start >= 0:
                values = leaves[start : start + size]
            elif not leaf_items:
                values = built[first : first + size]
            else:
                values = [None] * size
                for item, child in zip(children, built[first : first + len(children)], strict=True):
                    values[item] = child
                for item, position in zip(leaf_items, positions, strict=True):
                    values[item] = leaves[position]
            y: Any
            if keys is None:
                y = values if kind is list else tuple(values)
            elif size <= _BLOCK:
                y = kind(zip(per_node[index], values, strict=True))
            else:
                now = per_node[index]
                y = kind()
                for a in range(0, size, _BLOCK):
                    y.update(zip(now[a : a + _BLOCK], values[a : a + _BLOCK], strict=True))
                    if clock.due(_TICK):
                        yield
                        clock.restart()
            if meta >= 0:
                y._metadata = metas[meta]
            built[index] = y
            if clock.due(1 + (size >> 4)):
                yield
                clock.restart()
        return built[0]
