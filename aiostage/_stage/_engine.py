"""The copy engine: :class:`StateDictStager` plans a staged copy and keeps its buffers.

The engine owns the cache of CPU staging storages, keyed weakly by the source
storage: staging the same state again reuses the same CPU memory (no page
faults, no allocator churn), and when a source storage dies its staging
storage is dropped with it, so a run that replaces tensors does not grow
host memory (a problem users of other async checkpointers report).

Its public :meth:`StateDictStager.stage` is blocking and meant for worker
threads.  The async stagers use the two halves separately: :meth:`plan`
(run on the event loop in time slices) and a copier, then :meth:`commit`.
"""

from __future__ import annotations

import operator
import threading
import warnings
import weakref
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Generator
from itertools import repeat
from operator import eq, is_
from typing import Any, NamedTuple, TypeVar, cast

import torch

from aiostage._memory import MMAP_MIN_BYTES, mapped_storage
from aiostage._stage._options import accelerator_available
from aiostage._stage._plan import CopyRequest, StagePlan, byte_view, copy_failed
from aiostage._stage._shape import Shape, TimeSlice
from aiostage._stage._traverse import (
    _ATOMIC,
    _PLAIN_TENSORS,
    Path,
    Traversal,
    check_stageable,
    format_path,
    stageable,
    view_on,
)

__all__ = ["CacheInfo", "OnChecked", "StateDictStager", "pin_storage"]

T = TypeVar("T")

#: The ``on_checked`` hook of :meth:`StateDictStager.plan`: called with the
#: plan's request list, its ``whole`` map and a range ``[start, stop)`` of
#: requests that are final (their copies may start).  Both containers are
#: filled in as checks pass; other entries of the list are None until then.
OnChecked = Callable[[list[Any], dict[int, tuple[torch.Tensor, torch.Tensor]], int, int], None]

_CPU = torch.device("cpu")


class CacheInfo(NamedTuple):
    """The CPU storages a stager keeps for reuse: how many, and their bytes."""

    storages: int
    nbytes: int


def _cuda_host_register(storage: torch.UntypedStorage) -> bool:
    """Pin ``storage`` in place through CUDA; unpinned again when it dies."""
    cudart = torch.cuda.cudart()
    ptr, size = storage.data_ptr(), storage.nbytes()
    if int(cudart.cudaHostRegister(ptr, size, 0)) != 0:  # pragma: no cover - needs CUDA
        return False

    def unregister(ptr: int = ptr) -> None:  # pragma: no cover - needs CUDA
        cudart.cudaHostUnregister(ptr)

    weakref.finalize(storage, unregister)  # pragma: no cover - needs CUDA
    return True  # pragma: no cover - needs CUDA


def pin_storage(storage: torch.UntypedStorage) -> None:
    """Page-lock ``storage`` in place (blocking: call it from a worker thread).

    Pinning is registered on the existing allocation and undone when the
    storage is freed, so pinned memory is returned to the OS with its storage
    instead of staying fixed for the whole run.
    """
    if storage.nbytes() == 0 or storage.is_pinned():
        return
    if torch.cuda.is_available():
        _cuda_host_register(storage)  # pragma: no cover - needs CUDA


def _allocate(nbytes: int, *, shared: bool, pinned_alloc: bool) -> torch.UntypedStorage:
    if shared:
        return cast(torch.UntypedStorage, torch.UntypedStorage._new_shared(nbytes))
    if pinned_alloc:  # pragma: no cover - needs a non-CUDA accelerator
        return torch.empty((nbytes,), dtype=torch.uint8, pin_memory=True).untyped_storage()
    if nbytes >= MMAP_MIN_BYTES:  # see aiostage._memory
        return mapped_storage(nbytes)
    return torch.UntypedStorage(nbytes)


class _KeyedRef(weakref.ref[Any]):
    """A weak reference that remembers its dict key (one object per entry,
    with one shared callback per cache, instead of a closure per entry)."""

    __slots__ = ("key",)
    key: int

    def __new__(cls, obj: Any, callback: Any, key: int) -> _KeyedRef:
        self = super().__new__(cls, obj, callback)
        self.key = key
        return self

    def __init__(self, obj: Any, callback: Any, key: int) -> None:
        super().__init__(obj, callback)  # type: ignore[call-arg]


class _StorageCache:
    """Staging storages keyed weakly by their source storage.

    An entry disappears as soon as its source storage is freed.  Its staging
    storage is then kept as a *spare* of its size until the end of the next
    plan, which takes spares before allocating: a run that replaces tensors by
    new ones of the same shape reuses memory that is already touched (no page
    faults), and does not churn the allocator (freed large blocks that glibc
    keeps in its heap would otherwise make RSS creep up save after save).

    Lookups are a plain dict access on the storage's identity, which matters
    for states of tens of thousands of tensors.  The weakref callback may run
    in any thread; it only does single dict/list operations.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[_KeyedRef, torch.UntypedStorage]] = {}
        self._spares: dict[int, list[torch.UntypedStorage]] = {}
        #: Spares allocated ahead of a plan (see StateDictStager.allocate),
        #: never written: their first copy pays their page faults.
        self.untouched: set[int] = set()
        # One bound method for every entry's weak reference: ``self._dead``
        # makes a new one per access, a GC-tracked object per entry.
        self._on_dead = self._dead

    def _dead(self, ref: _KeyedRef) -> None:
        current = self._entries.get(ref.key)
        if current is not None and current[0] is ref:
            del self._entries[ref.key]
            dst = current[1]
            self._spares.setdefault(dst.nbytes(), []).append(dst)

    def get(self, src: torch.UntypedStorage) -> torch.UntypedStorage | None:
        entry = self._entries.get(src._cdata)
        if entry is not None and entry[0]() is src:
            return entry[1]
        return None

    def put(self, src: torch.UntypedStorage, dst: torch.UntypedStorage) -> None:
        key = src._cdata
        self._entries[key] = (_KeyedRef(src, self._on_dead, key), dst)

    def pop(self, src: torch.UntypedStorage) -> None:
        entry = self._entries.get(src._cdata)
        if entry is not None and entry[0]() is src:
            del self._entries[src._cdata]

    def spare(self, nbytes: int) -> torch.UntypedStorage | None:
        """A retired staging storage of exactly ``nbytes``, if one is kept."""
        spares = self._spares.get(nbytes)
        if spares:
            try:
                return spares.pop()
            except IndexError:  # emptied by another thread meanwhile
                return None
        return None

    def add_spare(self, dst: torch.UntypedStorage) -> None:
        self._spares.setdefault(dst.nbytes(), []).append(dst)

    def spare_count(self, nbytes: int) -> int:
        return len(self._spares.get(nbytes, ()))

    def drop_spares(self) -> None:
        self._spares = {}
        self.untouched = set()

    def storages(self) -> list[torch.UntypedStorage]:
        return [dst for _, dst in list(self._entries.values())]

    def clear(self) -> None:
        self._entries.clear()
        self.drop_spares()


class _TensorEntry(NamedTuple):
    """What a staged tensor was built from, to reuse it when nothing changed."""

    ref: _KeyedRef
    src_key: int
    dst_key: int
    dtype: torch.dtype
    offset: int
    size: torch.Size
    stride: tuple[int, ...]
    requires_grad: bool
    plain: torch.Tensor | None  # None when it is ``staged`` itself
    staged: torch.Tensor
    whole: bool


def _untouched(entry: _TensorEntry) -> bool:
    """Whether the cached staged tensor still is what was built.

    A caller may have changed a staged result in place (``unsqueeze_``,
    ``t_``, ``requires_grad_``, an attribute): such a tensor is rebuilt
    rather than handed out again.
    """
    for y in (entry.staged, entry.plain):
        if y is None:
            continue
        if (
            y.size() != entry.size
            or y.stride() != entry.stride
            or y.storage_offset() != entry.offset
            or y.untyped_storage()._cdata != entry.dst_key
            or getattr(y, "__dict__", None)
        ):
            return False
    return entry.staged.requires_grad == entry.requires_grad


class _TensorCache:
    """Staged tensor objects keyed weakly by their source tensor.

    Building a tensor view costs microseconds; a state of tens of thousands
    of tensors staged every few steps pays that again and again.  When a
    source tensor is unchanged (same storage, dtype, offset, size, stride and
    ``requires_grad``) and its staging storage is the same, its staged tensor
    from the previous call is returned again.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _TensorEntry] = {}
        self._on_dead = self._dead  # (one bound method, as in _StorageCache)

    def _dead(self, ref: _KeyedRef) -> None:
        current = self._entries.get(ref.key)
        if current is not None and current.ref is ref:
            del self._entries[ref.key]

    def get(self, t: torch.Tensor) -> _TensorEntry | None:
        entry = self._entries.get(id(t))
        if entry is not None and entry.ref() is t:
            return entry
        return None

    def put(
        self,
        t: torch.Tensor,
        src: torch.UntypedStorage,
        dst: torch.UntypedStorage,
        plain: torch.Tensor,
        staged: torch.Tensor,
        whole: bool,
    ) -> None:
        key = id(t)
        self._entries[key] = _TensorEntry(
            _KeyedRef(t, self._on_dead, key),
            src._cdata,
            dst._cdata,
            t.dtype,
            int(t.storage_offset()),
            t.size(),
            t.stride(),
            t.requires_grad,
            None if plain is staged else plain,
            staged,
            whole,
        )

    def clear(self) -> None:
        self._entries.clear()


class _Replay:
    """How the last successful plan staged a state, to stage it again fast.

    States are usually staged again and again built the same way over the
    same storages: the same objects, or new ones of new tensor objects, as
    ``model.state_dict()`` returns each call.  For a state of dicts, lists
    and tuples (see :class:`~aiostage._stage._shape.Shape`) whose leaves are
    plain tensors (without attributes, conjugate or negative bits) or atomic
    values, the engine keeps the shape of its containers and, per tensor,
    what it checked and built: the source tensor's type, its storage
    (weakly), its dtype and geometry, its staging storage, the staged tensor
    and its request number.  The next plan of a state of the same shape (the
    same container types, lengths and keys, in the same order) then checks
    each tensor against that record and rebuilds the plan from it without a
    traversal; any difference (another type or storage, dtype, offset, size,
    stride or ``requires_grad``, a resized storage, an attribute, a staged
    result the caller changed in place) abandons the replay and the full
    plan runs instead.

    When a recorded source storage dies the record is dropped at once, so it
    does not keep staging memory alive.  Records reference this object only
    through the weak references' callback; :meth:`kill` breaks that cycle.
    """

    __slots__ = ("by_device", "by_dst", "mixed", "records", "shape")

    def __init__(self, shape: Shape, by_dst: dict[int, int], mixed: str | None) -> None:
        self.shape = shape
        self.by_dst = by_dst
        self.mixed = mixed
        # The same source storages (checked) are on the same devices.
        self.by_device: dict[torch.device, list[int]] | None = None
        self.records: _Columns | None = _Columns()

    def kill(self, _ref: Any = None) -> None:
        """Forget every record (also the weak references' callback)."""
        self.records = None


class _Columns:
    """A replay's records, one list per field, one entry per tensor value."""

    __slots__ = (
        "atomic",
        "blocks",
        "complex",
        "creators",
        "dense",
        "dense_at",
        "dense_writes",
        "dsts",
        "dtypes",
        "nbytes",
        "offsets",
        "paths",
        "plains",
        "positions",
        "refs",
        "requires_grad",
        "sizes",
        "src_refs",
        "staged",
        "strides",
        "types",
        "writes",
    )

    def __init__(self) -> None:
        # Positions in the state's leaves (see Shape.flatten):
        self.atomic: list[int] = []  # of the atomic values
        self.positions: list[int] = []  # of the tensors
        # The source storages, weakly: their death drops the records at once
        # (the source *tensors* may be new objects every call, as
        # ``model.state_dict()`` makes them).
        self.refs: list[weakref.ref[torch.UntypedStorage]] = []
        self.types: list[type] = []  # each source tensor's exact type
        self.src_refs: list[_KeyedRef] = []
        self.dtypes: list[torch.dtype] = []
        self.offsets: list[int] = []
        self.sizes: list[torch.Size] = []
        self.strides: list[tuple[int, ...]] = []
        self.requires_grad: list[bool] = []
        self.dsts: list[torch.UntypedStorage] = []
        self.nbytes: list[int] = []
        self.staged: list[torch.Tensor] = []
        self.writes: list[torch.Tensor] = []  # what copies write into (the bare view)
        self.paths: list[Path] = []
        self.plains: list[tuple[int, torch.Tensor]] = []  # bare views other than staged
        self.creators: list[int] = []  # per request, the tensor that made it
        self.dense: list[int] = []  # requests copied tensor-to-tensor...
        self.dense_at: list[int] = []  # ...from these tensors
        self.dense_writes: list[torch.Tensor] = []
        #: The order to check blocks of tensors in: the most bytes first, so
        #: that copies started early (see ``StateDictStager.plan``) get the
        #: big ones going while the loop checks the many small ones.
        self.blocks: list[int] = []
        self.complex = False  # any tensor of a complex dtype


#: Check this many tensors at a time in a replay (a few hundred microseconds).
_REPLAY_BLOCK = 128

_new_tuple = tuple.__new__  # a NamedTuple with defaults builds through a Python call
_deref = weakref.ref.__call__
_attrs = operator.attrgetter("__dict__")
_dtype = operator.attrgetter("dtype")
_requires_grad = operator.attrgetter("requires_grad")
_storage = torch.Tensor.untyped_storage
_is_conj = torch.Tensor.is_conj
_is_neg = torch.Tensor.is_neg
_nbytes = torch.UntypedStorage.nbytes
_offset = torch.Tensor.storage_offset
_size = torch.Tensor.size
_stride = torch.Tensor.stride


def _plains_unchanged(cols: _Columns, plains: list[tuple[int, torch.Tensor]]) -> bool:
    """Whether the bare views that copies write into (other than the staged
    tensors themselves) are still as recorded."""
    for tensor, plain in plains:
        if (
            plain.size() != cols.sizes[tensor]
            or plain.stride() != cols.strides[tensor]
            or plain.storage_offset() != cols.offsets[tensor]
            or plain.untyped_storage() is not cols.dsts[tensor]
            or getattr(plain, "__dict__", None)
        ):
            return False
    return True


class StateDictStager:
    """Deep-copies any object so that every tensor lives in CPU memory.

    Args:
        pin_memory: pin staging storages of at least ``pin_memory_min_bytes``
            bytes (needs an accelerator; without one it warns once and is
            ignored).
        share_memory: allocate staging storages in shared memory.
        pin_memory_min_bytes: smaller storages are left unpinned.

    Tensors that share a storage share one CPU storage in the copy, with the
    same offsets, sizes and strides.  Staging storages are cached across calls
    (keyed weakly by the source storage) and refreshed in place.

    A staged result's tensors point into the cache: they are valid until the
    next call that stages the same sources, which overwrites them.  Not
    thread-safe: use one thread at a time (the async stagers serialize).
    """

    def __init__(
        self, pin_memory: bool = False, share_memory: bool = False, pin_memory_min_bytes: int = 5
    ) -> None:
        if pin_memory_min_bytes < 0:
            raise ValueError(f"pin_memory_min_bytes must be >= 0, got {pin_memory_min_bytes}")
        if pin_memory and not accelerator_available():
            warnings.warn(
                "aiostage: pin_memory=True needs an accelerator and none is available; "
                "staging into ordinary memory instead",
                RuntimeWarning,
                stacklevel=2,
            )
            pin_memory = False
        self.pin_memory = pin_memory
        self.share_memory = share_memory
        self.pin_memory_min_bytes = pin_memory_min_bytes
        self._cache = _StorageCache()
        self._tensors = _TensorCache()
        self._cuda_pinning = pin_memory and torch.cuda.is_available()
        self._lock = threading.Lock()
        self._replay: _Replay | None = None

    # -- public, blocking ----------------------------------------------------

    def stage(
        self,
        obj: T,
        non_blocking: bool = False,
        *,
        type_check: bool = False,
        _refuse: Callable[[StagePlan], None] | None = None,
    ) -> T:
        """Return a deep copy of ``obj`` with every tensor in CPU memory.

        Blocks until the copies are issued (and, unless ``non_blocking``,
        complete).  With ``non_blocking=True`` device-to-host copies into
        pinned memory may still be running: synchronize the device before
        reading the result.

        With ``type_check`` it refuses leaves other than tensors, atomic
        values, dicts, lists and tuples.

        Raises:
            StagingError: an object cannot be copied; ``.path`` names it.
        """
        with self._lock:
            gen = self.plan(obj, type_check=type_check)
            try:
                while True:
                    next(gen)
            except StopIteration as stop:
                plan: StagePlan = stop.value
            try:
                if _refuse is not None:  # (a stager's check of the plan, before any copy)
                    _refuse(plan)
                self._copy_all(plan, non_blocking)
            except BaseException:
                self.discard(plan)
                raise
            self.commit(plan)
            return plan.result  # type: ignore[no-any-return]

    @staticmethod
    def _copy_all(plan: StagePlan, non_blocking: bool) -> None:
        for req in plan.requests:
            try:
                if req.pin:
                    pin_storage(req.dst)
                if req.nbytes:
                    byte_view(req.dst).copy_(byte_view(req.src), non_blocking=non_blocking)
            except Exception as exc:
                raise copy_failed(req, exc) from exc

    def cache_info(self) -> CacheInfo:
        """How many staging storages are cached, and their total bytes."""
        dsts = self._cache.storages()
        return CacheInfo(len(dsts), sum(d.nbytes() for d in dsts))

    def close(self) -> None:
        """Release every cached staging storage (pinned memory is unpinned
        when the last staged tensor using it is freed)."""
        self._drop_replay()
        self._cache.clear()
        self._tensors.clear()

    def _drop_replay(self) -> None:
        replay, self._replay = self._replay, None
        if replay is not None:
            replay.kill()

    # -- allocation ahead of a plan, for the async stagers ---------------------

    def fresh_sizes(self, obj: Any, budget_s: float | None) -> Generator[None, None, list[int]]:
        """The sizes of the mapped staging storages (``MMAP_MIN_BYTES`` or
        more) a plan of ``obj`` would have to allocate: one per source
        storage of a plain tensor in ``obj``'s dicts, lists and tuples that
        the cache holds no staging storage (or spare) for.  Smaller ones come
        from the heap, cheaply, and tensors elsewhere (in other objects,
        DTensors) are left to the plan, which allocates what it still needs.
        (Allocating 20,000 small storages ahead in a worker thread held the
        GIL for long stretches: the loop's p99 lag went from 1.5 to 5.2 ms.)

        A generator that yields about every ``budget_s``.
        """
        cache = self._cache
        sizes: list[int] = []
        seen: set[int] = set()
        spares: dict[int, int] = {}
        stack = [obj]
        visited: set[int] = set()
        clock = TimeSlice(budget_s)
        while stack:
            if clock.due():
                yield
                clock.restart()
            x = stack.pop()
            kind = type(x)
            if kind in _PLAIN_TENSORS:
                if not stageable(x):
                    continue
                src = x.untyped_storage()
                if src._cdata in seen:
                    continue
                seen.add(src._cdata)
                nbytes = src.nbytes()
                if nbytes < MMAP_MIN_BYTES:
                    continue
                dst = cache.get(src)
                if dst is not None and dst.nbytes() == nbytes:
                    continue
                if spares.setdefault(nbytes, cache.spare_count(nbytes)) > 0:
                    spares[nbytes] -= 1  # (a retired storage of that size will do)
                    continue
                sizes.append(nbytes)
            elif (kind is dict or kind is OrderedDict or kind is list or kind is tuple) and (
                id(x) not in visited
            ):
                visited.add(id(x))
                stack.extend(x.values() if isinstance(x, dict) else x)
        return sizes

    def _new_storage(self, nbytes: int) -> torch.UntypedStorage:
        """A new staging storage (pinned where asked and not pinned later
        through CUDA, see :meth:`_wants_pin`)."""
        return _allocate(
            nbytes,
            shared=self.share_memory,
            pinned_alloc=self._wants_pin(nbytes) and not self._cuda_pinning,
        )

    def _wants_pin(self, nbytes: int) -> bool:
        return self.pin_memory and nbytes >= self.pin_memory_min_bytes

    @property
    def replaying(self) -> bool:
        """Whether the next plan starts as a replay of the last one."""
        replay = self._replay
        return replay is not None and replay.records is not None

    def allocate(self, sizes: list[int]) -> None:
        """Allocate staging storages of ``sizes`` as spares for the next plan
        (blocking: for a worker thread; see :meth:`fresh_sizes`).

        Mapping memory is a system call that can wait in the kernel: on the
        development VM a watchdog caught single ``mmap`` calls of a first
        stage holding the event loop for 142-750 ms while the VM backed
        memory.  Allocated here, they hold a worker thread instead.
        """
        made = [self._new_storage(nbytes) for nbytes in sizes]
        for dst in made:
            self._cache.add_spare(dst)
            self._cache.untouched.add(dst._cdata)

    # -- the two halves the async stagers drive ------------------------------

    def plan(
        self,
        obj: Any,
        *,
        type_check: bool = False,
        budget_s: float | None = None,
        on_checked: OnChecked | None = None,
    ) -> Generator[None, None, StagePlan]:
        """Traverse ``obj`` and build its :class:`StagePlan`; no bytes move here.

        A generator: with ``budget_s`` set it yields after about that much
        work so that an event loop can run in between.

        ``on_checked``: when the plan is a replay (see :class:`_Replay`) of
        a state whose tensors are all on CPU, each on a storage of its own,
        it is called after each block of tensors has passed its checks, with
        the requests final so far; the caller may start copying them while
        the plan goes on.  If a later block fails its checks the plan is
        built afresh (the same sources into the same staging storages), so
        copies started early are never wrong, only repeated.
        """
        replay, self._replay = self._replay, None
        if replay is not None:
            replayed = yield from self._replay_plan(obj, replay, budget_s, on_checked)
            if replayed is not None:
                return replayed
            replay.kill()
        requests: list[CopyRequest] = []
        # Fresh staging storages enter the cache as they are allocated (so the
        # cost is spread over the time-sliced traversal) and are taken out
        # again by discard() if the stage fails.
        new_entries: list[torch.UntypedStorage] = []
        seen: dict[int, torch.UntypedStorage] = {}
        cache = self._cache
        # Requests whose first tensor covers its whole storage, densely: their
        # bytes can be copied tensor-to-tensor, many in one foreach call.
        whole: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        created = [-1]  # index of the request the last storage_for() made
        by_dst: dict[int, int] = {}
        # Request indices by source device, grouped here in the time-sliced
        # traversal (asking 20,000 storages for their device afterwards, in
        # StagePlan.by_device, held the loop for 5 ms).
        by_device: dict[torch.device, list[int]] = {}
        # Storages viewed with two dtypes stage fine, but torch.save's format
        # (and so persist) cannot hold them: remember the first such tensor.
        dtypes: dict[int, torch.dtype] = {}
        mixed: list[Path] = []

        def storage_for(
            src: torch.UntypedStorage, path: Path, dtype: torch.dtype
        ) -> torch.UntypedStorage:
            key = src._cdata
            dst = seen.get(key)
            if dst is not None:
                if dtypes[key] is not dtype and not mixed:
                    mixed.append(path)
                return dst
            dtypes[key] = dtype
            nbytes = src.nbytes()
            dst = cache.get(src)
            fresh = dst is None or dst.nbytes() != nbytes
            allocated = False
            if fresh:
                pin = self._wants_pin(nbytes)
                dst = cache.spare(nbytes)
                if dst is not None and dst._cdata in cache.untouched:
                    cache.untouched.discard(dst._cdata)
                    allocated = True  # (allocated ahead, not yet written)
                if dst is None or dst.is_shared() != self.share_memory:
                    allocated = True
                    dst = self._new_storage(nbytes)
                if cache.get(src) is None:
                    new_entries.append(src)
                cache.put(src, dst)
                pin = pin and self._cuda_pinning
            else:
                pin = False
            assert dst is not None
            created[0] = by_dst[dst._cdata] = len(requests)
            by_device.setdefault(src.device, []).append(len(requests))
            requests.append(CopyRequest(src, dst, nbytes, path, pin, allocated))
            seen[key] = dst
            return dst

        tensors = self._tensors

        def stage_tensor(t: torch.Tensor, path: Path) -> torch.Tensor:
            # Fast path: the same source tensor, unchanged since the last
            # stage, on the same staging storage -> the same staged tensor.
            entry = tensors.get(t)
            if entry is not None and not getattr(t, "__dict__", None):
                src = t.untyped_storage()
                if (
                    src._cdata == entry.src_key
                    and t.dtype is entry.dtype
                    and t.storage_offset() == entry.offset
                    and t.size() == entry.size
                    and t.stride() == entry.stride
                    and t.requires_grad == entry.requires_grad
                ):
                    dst = storage_for(src, path, t.dtype)
                    if dst._cdata == entry.dst_key and _untouched(entry):
                        index, created[0] = created[0], -1
                        if index >= 0 and entry.whole:
                            plain = entry.staged if entry.plain is None else entry.plain
                            whole[index] = (t, plain)
                        return entry.staged
            src = check_stageable(t, path)
            dst = storage_for(src, path, t.dtype)
            plain, staged = view_on(t, dst)
            index, created[0] = created[0], -1
            dense = (
                index >= 0
                and t.storage_offset() == 0
                and t.is_contiguous()
                and t.nbytes == requests[index].nbytes
                and not t.is_conj()
                and not t.is_neg()
            )
            if dense:
                whole[index] = (t, plain)
            if not getattr(t, "__dict__", None):
                tensors.put(t, src, dst, plain, staged, dense)
            return staged

        traversal = Traversal(stage_tensor, type_check=type_check, budget_s=budget_s)
        try:
            result = yield from traversal.run(obj)
            mixed_path = format_path(mixed[0]) if mixed else None
            replay = yield from self._record(obj, result, requests, by_dst, mixed_path, budget_s)
        except BaseException:  # including GeneratorExit when the caller gives up
            for src in new_entries:
                cache.pop(src)
            raise
        finally:
            cache.drop_spares()  # spares not taken by this plan are freed
        plan = StagePlan(result, requests, new_entries, whole, by_dst)
        plan._by_device = by_device
        plan.mixed_dtypes = mixed_path
        plan.replay = replay
        return plan

    def _record(
        self,
        obj: Any,
        result: Any,
        requests: list[CopyRequest],
        by_dst: dict[int, int],
        mixed: str | None,
        budget_s: float | None,
    ) -> Generator[None, None, _Replay | None]:
        """The :class:`_Replay` of a fresh plan, or None if none applies.

        A generator that yields like the traversal (about every ``budget_s``).
        """
        if budget_s is not None:
            yield  # the traversal may have used up its slice
        clock = TimeSlice(budget_s)
        recorded = yield from Shape.record(obj, result, clock)
        if recorded is None:
            return None
        shape, values, outs, paths = recorded
        replay = _Replay(shape, by_dst, mixed)
        kill = replay.kill
        tensor_entry = self._tensors.get
        storage_entry = self._cache._entries.get
        cols = _Columns()
        created = 0
        for position, value in enumerate(values):
            if clock.due():
                yield
                clock.restart()
            cls = type(value)
            if cls in _ATOMIC:
                cols.atomic.append(position)
                continue
            if (
                cls not in _PLAIN_TENSORS
                or getattr(value, "__dict__", None)
                or value.is_conj()
                or value.is_neg()
            ):
                return None
            entry = tensor_entry(value)
            if entry is None or entry.staged is not outs[position]:
                return None
            index = by_dst.get(entry.dst_key)
            if index is None or index > created:
                return None
            req = requests[index]
            stored = storage_entry(entry.src_key)
            if stored is None or stored[1] is not req.dst or stored[0]() is not req.src:
                return None
            tensor = len(cols.refs)
            if index == created:
                created += 1
                cols.creators.append(tensor)
                if entry.whole:
                    cols.dense.append(index)
                    cols.dense_at.append(tensor)
            cols.positions.append(position)
            cols.refs.append(weakref.ref(value.untyped_storage(), kill))
            cols.types.append(cls)
            cols.src_refs.append(stored[0])
            cols.dtypes.append(entry.dtype)
            cols.offsets.append(entry.offset)
            cols.sizes.append(entry.size)
            cols.strides.append(entry.stride)
            cols.requires_grad.append(entry.requires_grad)
            cols.dsts.append(req.dst)
            cols.nbytes.append(req.nbytes)
            cols.staged.append(entry.staged)
            cols.paths.append(paths[position])
            if entry.plain is None:
                cols.writes.append(entry.staged)
            else:
                cols.writes.append(entry.plain)
                cols.plains.append((tensor, entry.plain))
        if created != len(requests) or replay.records is None:  # None: a source died
            return None
        cols.dense_writes = [cols.writes[t] for t in cols.dense_at]
        cols.complex = any(dtype.is_complex for dtype in set(cols.dtypes))
        starts = range(0, len(cols.refs), _REPLAY_BLOCK)
        weight = [-sum(cols.nbytes[a : a + _REPLAY_BLOCK]) for a in starts]
        cols.blocks = [starts[k] for k in sorted(range(len(starts)), key=weight.__getitem__)]
        replay.records = cols
        return replay

    def _replay_plan(
        self,
        obj: Any,
        replay: _Replay,
        budget_s: float | None,
        on_checked: OnChecked | None = None,
    ) -> Generator[None, None, StagePlan | None]:
        """The plan of ``obj`` rebuilt from ``replay``, or None if anything changed.

        No cache changes here: when it returns None nothing happened (beyond
        copies that ``on_checked`` started, see :meth:`plan`).  The checks
        run column by column over blocks of tensors (``map`` over torch's
        methods, compared element by element in C), which costs a fraction
        of a Python loop per tensor.
        """
        cols = replay.records
        if cols is None:
            return None
        clock = TimeSlice(budget_s)
        flat = yield from replay.shape.flatten(obj, clock)
        if flat is None or replay.records is not cols:  # (a source died meanwhile)
            return None
        values, per_node, metas = flat
        tensors = values
        if cols.atomic:  # the leaves mix tensors and atomic values: sort them out
            tensors = []
            pick = values.__getitem__
            for a in range(0, max(len(cols.atomic), len(cols.positions)), _REPLAY_BLOCK * 8):
                b = a + _REPLAY_BLOCK * 8
                if not all(map(_ATOMIC.__contains__, map(type, map(pick, cols.atomic[a:b])))):
                    return None
                tensors += map(pick, cols.positions[a:b])
                if clock.over():
                    yield
                    clock.restart()
        count = len(tensors)
        if count != len(cols.refs):
            return None
        creators, dsts, nbytes, paths = cols.creators, cols.dsts, cols.nbytes, cols.paths
        dense, dense_at, dense_writes = cols.dense, cols.dense_at, cols.dense_writes
        own = len(creators) == count  # every tensor has a storage of its own
        # Stream the requests out block by block as they pass their checks
        # (see plan()): only where a request is a tensor (``own``), all on
        # CPU, and a checkpoint can hold the state (save() refuses mixed
        # dtypes before copying anything).
        stream = (
            on_checked is not None
            and own
            and replay.mixed is None
            and replay.by_device is not None
            and list(replay.by_device) == [_CPU]
            and count == len(replay.by_dst)
        )
        plain_at = [tensor for tensor, _ in cols.plains]
        requests: list[Any] = [None] * count if stream else []
        whole: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        srcs: list[Any] = [None] * count
        for a in cols.blocks:
            b = min(a + _REPLAY_BLOCK, count)
            ts = tensors[a:b]
            # Tensor objects may be new (``model.state_dict()`` detaches
            # afresh each call): what counts is their type, storage, dtype
            # and geometry, all checked below.
            if (
                not all(map(is_, map(type, ts), cols.types[a:b]))
                or any(map(_attrs, ts))
                # (only a complex tensor can have its conjugate bit set, and
                # the dtypes are checked below)
                or (cols.complex and any(map(_is_conj, ts)))
                or any(map(_is_neg, ts))
            ):
                return None
            ss = list(map(_storage, ts))
            # src_refs are the storage cache's references to the source
            # storages: such a cache entry changes only through a plan (which
            # took this replay away), discard() or close() (which kill it),
            # or the source's death (then the reference is dead).  So the
            # same storage still stages into the recorded staging storage.
            if not all(map(is_, map(_deref, cols.src_refs[a:b]), ss)):
                return None
            sizes, strides, offsets = cols.sizes[a:b], cols.strides[a:b], cols.offsets[a:b]
            requires_grad = cols.requires_grad[a:b]
            staged = cols.staged[a:b]
            if (
                not all(map(eq, map(_nbytes, ss), nbytes[a:b]))
                or not all(map(is_, map(_dtype, ts), cols.dtypes[a:b]))
                or not all(map(eq, map(_offset, ts), offsets))
                or not all(map(eq, map(_size, ts), sizes))
                or not all(map(eq, map(_stride, ts), strides))
                or not all(map(is_, map(_requires_grad, ts), requires_grad))
                # The caller may have changed a staged result in place
                # (see _untouched).
                or not all(map(is_, map(_requires_grad, staged), requires_grad))
                or not all(map(eq, map(_size, staged), sizes))
                or not all(map(eq, map(_stride, staged), strides))
                or not all(map(eq, map(_offset, staged), offsets))
                or not all(map(is_, map(_storage, staged), cols.dsts[a:b]))
                or any(map(_attrs, staged))
            ):
                return None
            if stream:
                lo, hi = bisect_left(plain_at, a), bisect_left(plain_at, b)
                if not _plains_unchanged(cols, cols.plains[lo:hi]):
                    return None
                pieces = zip(ss, dsts[a:b], nbytes[a:b], paths[a:b], repeat(False), repeat(False))
                requests[a:b] = map(_new_tuple, repeat(CopyRequest), pieces)
                lo, hi = bisect_left(dense, a), bisect_left(dense, b)
                sources = map(tensors.__getitem__, dense_at[lo:hi])
                pairs = zip(sources, dense_writes[lo:hi], strict=True)
                whole.update(zip(dense[lo:hi], pairs, strict=True))
                assert on_checked is not None
                on_checked(requests, whole, a, b)
            else:
                srcs[a:b] = ss
            if clock.over():
                yield
                clock.restart()
        if not stream:
            if not _plains_unchanged(cols, cols.plains):
                return None
            # Everything checked: assemble the plan, in blocks too.
            for a in range(0, len(creators), _REPLAY_BLOCK):
                b = a + _REPLAY_BLOCK
                if own:
                    pieces = zip(
                        srcs[a:b], dsts[a:b], nbytes[a:b], paths[a:b], repeat(False), repeat(False)
                    )
                    requests += map(_new_tuple, repeat(CopyRequest), pieces)
                else:
                    requests += [
                        _new_tuple(
                            CopyRequest, (srcs[t], dsts[t], nbytes[t], paths[t], False, False)
                        )
                        for t in creators[a:b]
                    ]
                if clock.over():
                    yield
                    clock.restart()
            for a in range(0, len(dense), _REPLAY_BLOCK):
                b = a + _REPLAY_BLOCK
                sources = map(tensors.__getitem__, dense_at[a:b])
                whole.update(
                    zip(dense[a:b], zip(sources, dense_writes[a:b], strict=True), strict=True)
                )
                if clock.over():
                    yield
                    clock.restart()
        out = cols.staged
        if cols.atomic:
            out = values  # (flatten's own list) with the staged tensors in place
            for a in range(0, len(cols.positions), _REPLAY_BLOCK * 8):
                b = a + _REPLAY_BLOCK * 8
                for position, y in zip(cols.positions[a:b], cols.staged[a:b], strict=True):
                    out[position] = y
                if clock.over():
                    yield
                    clock.restart()
        result = yield from replay.shape.build(out, per_node, metas, clock)
        if len(requests) != len(replay.by_dst):
            return None
        self._cache.drop_spares()
        request_nbytes = nbytes if own else [nbytes[t] for t in creators]
        plan = StagePlan(result, requests, [], whole, replay.by_dst, sizes=request_nbytes)
        plan.mixed_dtypes = replay.mixed
        plan.replay = replay
        plan._by_device = replay.by_device
        return plan

    def commit(self, plan: StagePlan) -> None:
        """Keep the storages ``plan`` allocated in the cache (on success)."""
        plan.new_entries = []
        replay, plan.replay = plan.replay, None
        if replay is not None and replay.records is not None:
            if replay.by_device is None:
                replay.by_device = plan._by_device
            self._drop_replay()
            self._replay = replay

    def discard(self, plan: StagePlan) -> None:
        """Forget a plan that failed or was cancelled: the storages it
        allocated leave the cache again, so nothing half-staged stays."""
        for src in plan.new_entries:
            self._cache.pop(src)
        plan.new_entries = []
        replay, plan.replay = plan.replay, None
        if replay is not None and replay is not self._replay:
            replay.kill()
