"""The wire format and the blocking point-to-point exchange with one partner rank.

A message from one rank to its partner is, in order, on one tag:

1. **header**: an ``int64`` tensor of 6 elements
   ``[MAGIC, VERSION, kind, payload, meta_nbytes, n_storages]``;
   ``kind`` is :data:`KIND_STAGE` or :data:`KIND_RECOVER`; ``payload`` is
   1 when metadata and storages follow, 0 for "nothing to send" and 2 for
   "the sender failed before it could send" (so the partner fails at once
   instead of timing out).  Nothing follows a header whose payload is not 1.
2. **metadata** (only if ``meta_nbytes > 0``): a ``uint8`` tensor holding
   ``u64 n`` then ``n`` little-endian ``u64`` storage sizes, followed by a
   pickle (protocol 4) of the state in which every tensor is replaced by a
   persistent id (see below).  No tensor bytes are in the pickle.
3. **storages**: each unique storage once, in the order of the size table,
   as a ``uint8`` tensor viewing the whole storage (zero-size storages are
   not sent).  The receiver allocates one fresh ``UntypedStorage`` per entry
   and receives straight into it, then builds every tensor on it with
   ``set_(storage, offset, size, stride)``: views of one storage arrive
   sharing one storage, as they were sent.

Persistent ids (plain tuples of ints and strings)::

    ("t", tid, sid, offset, size, stride, dtype, requires_grad, param, conj, neg, attrs)
    ("ref", tid)                       the same tensor object again
    ("dt", tid, local, mesh_key, placements, shape, stride, requires_grad)
    ("st", tid, [(shard, offsets, sizes, placement)], size, dtype,
           requires_grad, pin_memory, [(offsets, sizes, placement)], group_name)

DTensors travel as their local tensor plus placements and global shape; the
receiver rebuilds them on its *own* :class:`DeviceMesh` with the same device
type, rank layout and dim names (the mesh is global, so both ranks have it).
ShardedTensors travel as their local shards plus the global shard layout and
are rebuilt with the receiver's process group.

Trust model: the metadata is unpickled with a restricted unpickler that only
resolves containers and atomic types, ``torch`` dtypes, sizes and devices,
and the globals registered with :func:`torch.serialization.add_safe_globals`.
Any other global (a user dataclass, say) is refused with a
:class:`ReplicationError` naming it; register it to allow it.

All functions here block; the stager runs them in worker threads.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from aiostage._exceptions import PeerTimeoutError, ReplicationError

__all__ = [
    "KIND_RECOVER",
    "KIND_STAGE",
    "Channel",
    "Encoded",
    "MeshKey",
    "decode",
    "encode",
    "mesh_key",
]

MAGIC = 0x61696F7374616765 & 0x7FFFFFFFFFFFFFFF  # "aiostage"
VERSION = 1
KIND_STAGE = 1
KIND_RECOVER = 2
PAYLOAD_NONE = 0
PAYLOAD_STATE = 1
PAYLOAD_FAILED = 2
TAG = 0x5A17
"""The point-to-point tag every replication message uses."""

PICKLE_PROTOCOL = 4

MeshKey = tuple[str, tuple[int, ...], tuple[int, ...], tuple[str, ...] | None]
"""(device type, flattened rank layout, mesh shape, dim names)."""

_HEADER_LEN = 6


def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _sharded_cls() -> type | None:
    try:
        from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return ShardedTensor


def mesh_key(mesh: Any) -> MeshKey:
    """The identity of a :class:`DeviceMesh` that every rank computes alike."""
    layout = mesh.mesh
    names = mesh.mesh_dim_names
    return (
        str(mesh.device_type),
        tuple(int(r) for r in layout.flatten().tolist()),
        tuple(int(s) for s in layout.shape),
        tuple(names) if names is not None else None,
    )


# --- encoding -----------------------------------------------------------------


@dataclass
class Encoded:
    """A state ready to send: the metadata bytes and the storages they name."""

    meta: bytes
    storages: list[torch.UntypedStorage]
    meshes: dict[MeshKey, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.meta) + sum(s.nbytes() for s in self.storages)


def _encode_placement(p: Any) -> tuple[Any, ...]:
    from torch.distributed.tensor.placement_types import (
        Partial,
        Replicate,
        Shard,
        _StridedShard,
    )

    if isinstance(p, _StridedShard):
        return ("SS", int(p.dim), int(p.split_factor))
    if isinstance(p, Shard):
        return ("S", int(p.dim))
    if isinstance(p, Replicate):
        return ("R",)
    if isinstance(p, Partial):
        return ("P", str(p.reduce_op))
    raise ReplicationError(f"cannot replicate a DTensor with placement {p!r}")


def _decode_placement(code: tuple[Any, ...]) -> Any:
    from torch.distributed.tensor.placement_types import (
        Partial,
        Replicate,
        Shard,
        _StridedShard,
    )

    kind = code[0]
    if kind == "S":
        return Shard(code[1])
    if kind == "SS":
        return _StridedShard(code[1], split_factor=code[2])
    if kind == "R":
        return Replicate()
    if kind == "P":
        return Partial(code[1])
    raise ReplicationError(f"unknown placement code {code!r} in the metadata")


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self.storages: list[torch.UntypedStorage] = []
        self.meshes: dict[MeshKey, Any] = {}
        self._sids: dict[int, int] = {}
        self._tids: dict[int, int] = {}
        self._keep: list[Any] = []  # keeps id()s unique while pickling
        self._dtensor: Any = _dtensor_cls()
        self._sharded: Any = _sharded_cls()

    def _sid(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        if storage.device.type != "cpu":
            raise ReplicationError(
                f"a storage lives on {storage.device}; the replication stager sends "
                "staged CPU state only"
            )
        key = storage._cdata
        sid = self._sids.get(key)
        if sid is None:
            sid = self._sids[key] = len(self.storages)
            self.storages.append(storage)
        return sid

    def _new_tid(self, t: Any) -> int:
        tid = self._tids[id(t)] = len(self._tids)
        self._keep.append(t)
        return tid

    def _plain(self, t: torch.Tensor) -> tuple[Any, ...]:
        if t.layout is not torch.strided or t.is_quantized or t.is_nested:
            raise ReplicationError(f"cannot replicate a tensor with layout {t.layout}")
        tid = self._new_tid(t)
        attrs = getattr(t, "__dict__", None)
        return (
            "t",
            tid,
            self._sid(t),
            int(t.storage_offset()),
            tuple(t.size()),
            tuple(t.stride()),
            str(t.dtype).removeprefix("torch."),
            bool(t.requires_grad),
            isinstance(t, torch.nn.Parameter),
            bool(t.is_conj()),
            bool(t.is_neg()),
            dict(attrs) if attrs else None,
        )

    def persistent_id(self, obj: Any) -> Any:
        return self._pid(obj)

    def _pid(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage | torch.UntypedStorage):
            raise ReplicationError("cannot replicate a bare storage; wrap it in a tensor")
        if not isinstance(obj, torch.Tensor):
            return None
        tid = self._tids.get(id(obj))
        if tid is not None:
            return ("ref", tid)
        cls = type(obj)
        if cls is torch.Tensor or cls is torch.nn.Parameter:
            return self._plain(obj)
        return self._subclass_pid(obj, cls)

    def _subclass_pid(self, obj: Any, cls: type) -> Any:
        if self._dtensor is not None and isinstance(obj, self._dtensor):
            spec = obj._spec
            key = mesh_key(spec.mesh)
            self.meshes.setdefault(key, spec.mesh)
            tid = self._new_tid(obj)
            return (
                "dt",
                tid,
                obj._local_tensor,
                key,
                tuple(_encode_placement(p) for p in spec.placements),
                tuple(obj.size()),
                tuple(obj.stride()),
                bool(obj.requires_grad),
            )
        if self._sharded is not None and isinstance(obj, self._sharded):
            meta = obj.metadata()
            props = meta.tensor_properties
            pg = obj._process_group
            tid = self._new_tid(obj)
            return (
                "st",
                tid,
                [
                    (
                        s.tensor,
                        list(s.metadata.shard_offsets),
                        list(s.metadata.shard_sizes),
                        str(s.metadata.placement),
                    )
                    for s in obj.local_shards()
                ],
                tuple(meta.size),
                str(props.dtype).removeprefix("torch."),
                bool(props.requires_grad),
                bool(props.pin_memory),
                [
                    (list(m.shard_offsets), list(m.shard_sizes), str(m.placement))
                    for m in meta.shards_metadata
                ],
                getattr(pg, "group_name", None),
            )
        if issubclass(cls, torch.nn.Parameter):
            return self._plain(obj)
        raise ReplicationError(
            f"cannot replicate a tensor subclass {cls.__module__}.{cls.__qualname__}"
        )


def encode(obj: Any) -> Encoded:
    """Pickle ``obj``'s structure; collect its unique storages (no bytes copied)."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    try:
        pickler.dump(obj)
    except ReplicationError:
        raise
    except Exception as exc:
        raise ReplicationError(f"cannot encode the state for replication: {exc!r}") from exc
    sizes = [s.nbytes() for s in pickler.storages]
    table = struct.pack(f"<Q{len(sizes)}Q", len(sizes), *sizes)
    return Encoded(table + buf.getvalue(), pickler.storages, pickler.meshes)


# --- decoding -----------------------------------------------------------------

_SAFE_BUILTINS = {
    "set",
    "frozenset",
    "complex",
    "slice",
    "range",
    "bytearray",
    "bytes",
    "int",
    "float",
    "bool",
    "str",
    "tuple",
    "list",
    "dict",
}
_SAFE_COLLECTIONS = {"OrderedDict", "deque", "Counter"}
_SAFE_TORCH = {"Size", "device", "layout", "memory_format"}


def _registered_safe_globals() -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            obj, name = entry
            module, _, qual = name.rpartition(".")
        else:
            obj = entry
            module, qual = obj.__module__, obj.__qualname__
        found[(module, qual)] = obj
    return found


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, load: Callable[[Any], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._load = load
        self._extra = _registered_safe_globals()

    def persistent_load(self, pid: Any) -> Any:
        return self._load(pid)

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module == "collections" and name in _SAFE_COLLECTIONS:
            return getattr(collections, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if name in _SAFE_TORCH or isinstance(value, torch.dtype):
                return value
        found = self._extra.get((module, name))
        if found is not None:
            return found
        raise ReplicationError(
            f"refused to unpickle the global {module}.{name} from the partner's metadata; "
            "allow it with torch.serialization.add_safe_globals([...])"
        )


def read_table(meta: bytes) -> tuple[list[int], int]:
    """The storage sizes at the head of ``meta``, and where the pickle starts."""
    if len(meta) < 8:
        raise ReplicationError("truncated replication metadata")
    (n,) = struct.unpack_from("<Q", meta, 0)
    end = 8 + 8 * n
    if end > len(meta):
        raise ReplicationError("truncated replication metadata (storage table)")
    return list(struct.unpack_from(f"<{n}Q", meta, 8)), end


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ReplicationError(f"unknown dtype {name!r} in the metadata")
    return value


class _Builder:
    """Rebuilds tensors from persistent ids onto the received storages."""

    def __init__(
        self,
        storages: list[torch.UntypedStorage],
        meshes: dict[MeshKey, Any],
        default_pg: Any,
    ) -> None:
        self.storages = storages
        self.meshes = meshes
        self.default_pg = default_pg
        self.tensors: dict[int, torch.Tensor] = {}

    def __call__(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise ReplicationError(f"malformed persistent id {pid!r}")
        kind = pid[0]
        if kind == "ref":
            return self.tensors[pid[1]]
        if kind == "t":
            return self._plain(pid)
        if kind == "dt":
            return self._dtensor(pid)
        if kind == "st":
            return self._sharded(pid)
        raise ReplicationError(f"unknown persistent id kind {kind!r}")

    def _plain(self, pid: tuple[Any, ...]) -> torch.Tensor:
        _, tid, sid, offset, size, stride, dtype, requires_grad, param, conj, neg, attrs = pid
        with torch.no_grad():
            t = torch.empty((0,), dtype=_dtype(dtype)).set_(
                self.storages[sid], offset, size, stride
            )
        if conj:
            t = t.conj()
        if neg:
            t = t._neg_view()
        if param:
            t = torch.nn.Parameter(t, requires_grad=requires_grad)
        elif requires_grad:
            t.requires_grad_(True)
        if attrs:
            for key, value in attrs.items():
                # Only plain instance attributes, never torch's own (``data``,
                # ``grad``, dunders): the sender only sends ``t.__dict__``.
                if not isinstance(key, str) or key.startswith("__") or hasattr(torch.Tensor, key):
                    raise ReplicationError(f"refused tensor attribute {key!r} in the metadata")
                setattr(t, key, value)
        self.tensors[tid] = t
        return t

    def _dtensor(self, pid: tuple[Any, ...]) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

        _, tid, local, key, placements, shape, stride, requires_grad = pid
        mesh = self.meshes.get(tuple(key) if not isinstance(key, tuple) else key)
        if mesh is None:
            raise ReplicationError(
                f"received a DTensor on a device mesh {key!r} that this rank does not know; "
                "pass it to ReplicationStager(device_meshes=[...])"
            )
        spec = DTensorSpec(
            mesh,
            tuple(_decode_placement(p) for p in placements),
            tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), local.dtype),
        )
        t = DTensor(local, spec, requires_grad=requires_grad)
        self.tensors[tid] = t
        return t

    def _sharded(self, pid: tuple[Any, ...]) -> torch.Tensor:
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor.api import ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import (
            ShardedTensorMetadata,
            TensorProperties,
        )
        from torch.distributed._shard.sharded_tensor.shard import Shard
        from torch.distributed._shard.sharding_spec.api import (
            _infer_sharding_spec_from_shards_metadata,
        )

        _, tid, local, size, dtype, requires_grad, pin_memory, layout, group_name = pid
        shards = [
            Shard(tensor=t, metadata=ShardMetadata(offsets, sizes, placement))
            for t, offsets, sizes, placement in local
        ]
        all_meta = [ShardMetadata(o, s, p) for o, s, p in layout]
        props = TensorProperties(
            dtype=_dtype(dtype), requires_grad=requires_grad, pin_memory=pin_memory
        )
        metadata = ShardedTensorMetadata(all_meta, torch.Size(size), props)
        pg = self._group(group_name)
        spec = _infer_sharding_spec_from_shards_metadata(all_meta)
        # The shards are the partner's: ShardedTensor's public constructors
        # check them against this rank's slots, so build it the way they do
        # after their checks.
        st = ShardedTensor.__new__(
            ShardedTensor,
            spec,
            *size,
            dtype=props.dtype,
            layout=torch.strided,
            pin_memory=pin_memory,
            requires_grad=requires_grad,
        )
        st._metadata = metadata
        st._local_shards = shards
        st._prepare_init(process_group=pg, init_rrefs=False)
        st._post_init()
        self.tensors[tid] = st
        return st  # type: ignore[no-any-return]

    def _group(self, name: str | None) -> Any:
        if name is not None:
            try:
                resolve: Any = getattr(dist.distributed_c10d, "_resolve_process_group")  # noqa: B009
                return resolve(name)
            except Exception:
                pass
        return self.default_pg


def decode(
    meta: bytes,
    storages: list[torch.UntypedStorage],
    *,
    meshes: dict[MeshKey, Any] | None = None,
    default_pg: Any = None,
) -> Any:
    """Rebuild a state from its metadata and its received storages."""
    _, start = read_table(meta)
    builder = _Builder(storages, meshes or {}, default_pg)
    try:
        return _Unpickler(meta[start:], builder).load()
    except ReplicationError:
        raise
    except Exception as exc:
        raise ReplicationError(f"cannot decode the partner's state: {exc!r}") from exc


# --- the channel ----------------------------------------------------------------


@dataclass
class Received:
    """One message from the partner."""

    kind: int
    meta: bytes | None
    storages: list[torch.UntypedStorage]
    failed: bool = False


class Channel:
    """Blocking send/recv of whole messages with one partner over a process group.

    Every wait is bounded by ``timeout``: a partner that does not answer in
    time, or whose connection drops, raises :class:`PeerTimeoutError`.
    ``cancel`` (a :class:`threading.Event`) is checked between operations, so
    a cancelled exchange stops after the operation in flight.

    ``device`` is where the wire buffers live: CPU for gloo, the accelerator
    for NCCL-like backends (the staged CPU bytes are then copied to and from
    device buffers).
    """

    def __init__(
        self,
        pg: Any,
        peer: int,
        peer_global: int,
        timeout: timedelta,
        device: torch.device,
    ) -> None:
        self.pg = pg
        self.peer = peer
        self.peer_global = peer_global
        self.timeout = timeout
        self.device = device

    # -- low level ------------------------------------------------------------

    def _fail(self, what: str, exc: BaseException) -> PeerTimeoutError:
        seconds = self.timeout.total_seconds()
        return PeerTimeoutError(
            f"{what} did not complete within {seconds:g} s or the connection was lost ({exc})",
            peer=self.peer_global,
        )

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as exc:
            raise self._fail(what, exc) from exc

    def _post(self, op: str, t: torch.Tensor, what: str) -> Any:
        try:
            if op == "send":
                return self.pg.send([t], self.peer, TAG)
            return self.pg.recv([t], self.peer, TAG)
        except Exception as exc:
            raise self._fail(what, exc) from exc

    @staticmethod
    def _check(cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise ReplicationError("the exchange was cancelled")

    def _wire(self, storage: torch.UntypedStorage) -> torch.Tensor:
        t = torch.empty((0,), dtype=torch.uint8).set_(storage)
        return t if self.device.type == "cpu" else t.to(self.device)

    # -- messages ---------------------------------------------------------------

    def send(
        self,
        kind: int,
        enc: Encoded | None,
        cancel: threading.Event | None = None,
        *,
        failed: bool = False,
    ) -> None:
        """Send one message (``enc=None``: a header saying "nothing", or with
        ``failed`` "the sender failed")."""
        meta = enc.meta if enc is not None else b""
        storages = [s for s in enc.storages if s.nbytes() > 0] if enc is not None else []
        payload = PAYLOAD_FAILED if failed else PAYLOAD_NONE
        if enc is not None:
            payload = PAYLOAD_STATE
        header = torch.tensor(
            [MAGIC, VERSION, kind, payload, len(meta), len(storages)],
            dtype=torch.int64,
        )
        self._check(cancel)
        self._wait(self._post("send", header.to(self.device), "sending the header"), "sending")
        if enc is None:
            return
        meta_t = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
        self._check(cancel)
        self._wait(self._post("send", meta_t.to(self.device), "sending the metadata"), "sending")
        works = []
        for storage in storages:
            self._check(cancel)
            works.append(self._post("send", self._wire(storage), "sending a storage"))
        for work in works:
            self._wait(work, "sending a storage")

    def recv(
        self,
        cancel: threading.Event | None = None,
        *,
        on_meta: Callable[[Received], None] | None = None,
        on_landed: Callable[[torch.UntypedStorage], None] | None = None,
    ) -> Received:
        """Receive one message; storages land in fresh CPU storages.

        ``on_meta`` is called (in this thread) once the metadata is in and
        every storage is allocated and its receive posted, before any
        storage's bytes have landed; ``on_landed`` after each storage has.
        """
        header = torch.empty((_HEADER_LEN,), dtype=torch.int64, device=self.device)
        self._check(cancel)
        self._wait(self._post("recv", header, "receiving the header"), "receiving the header")
        magic, version, kind, payload, meta_len, n_storages = header.cpu().tolist()
        if magic != MAGIC or version != VERSION:
            raise ReplicationError(
                "the partner sent an unexpected header (not an aiostage replication message, "
                "or another aiostage version)",
                peer=self.peer_global,
            )
        if payload != PAYLOAD_STATE:
            return Received(kind, None, [], failed=payload == PAYLOAD_FAILED)
        if meta_len <= 0:
            raise ReplicationError(
                "the partner sent an empty metadata record", peer=self.peer_global
            )
        meta_buf = bytearray(meta_len)
        meta_cpu = torch.frombuffer(meta_buf, dtype=torch.uint8)
        meta_t = meta_cpu if self.device.type == "cpu" else meta_cpu.to(self.device)
        self._check(cancel)
        self._wait(self._post("recv", meta_t, "receiving the metadata"), "receiving")
        if meta_t is not meta_cpu:
            meta_cpu.copy_(meta_t)
        meta = bytes(meta_buf)
        sizes, _ = read_table(meta)
        storages = [torch.UntypedStorage(n) for n in sizes]
        nonempty = [s for s in storages if s.nbytes() > 0]
        if len(nonempty) != n_storages:
            raise ReplicationError(
                "the partner's header and metadata disagree on the storage count",
                peer=self.peer_global,
            )
        received = Received(kind, meta, storages)
        posted: list[tuple[Any, torch.Tensor, torch.UntypedStorage]] = []
        for storage in nonempty:
            self._check(cancel)
            if self.device.type == "cpu":
                buf = torch.empty((0,), dtype=torch.uint8).set_(storage)
            else:
                buf = torch.empty((storage.nbytes(),), dtype=torch.uint8, device=self.device)
            posted.append((self._post("recv", buf, "receiving a storage"), buf, storage))
        if on_meta is not None:
            on_meta(received)
        for work, buf, storage in posted:
            self._wait(work, "receiving a storage")
            if self.device.type != "cpu":
                torch.empty((0,), dtype=torch.uint8).set_(storage).copy_(buf)
            if on_landed is not None:
                on_landed(storage)
        return received


def global_rank(pg: Any, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``pg``."""
    try:
        return int(dist.get_global_rank(pg, group_rank))
    except Exception:
        return group_rank
