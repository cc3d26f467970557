"""``ReplicationStager``: stage to CPU, swap the state with a partner rank, persist it.

Pairing: in a group of even size ``W``, rank ``r`` pairs with
``(r + W // 2) % W``; the lower rank of a pair sends first, then receives,
the higher rank receives first, then sends, so a pair never deadlocks.  The
pairs work independently of each other (point-to-point, no collective).

One ``stage()``:

1. copies the state to CPU with a :class:`StateDictStager` (buffers cached
   across calls), so the caller may mutate the state as soon as ``stage()``
   returns;
2. sends it to the partner and receives the partner's (see
   :mod:`aiostage._replicate._transport` for the wire format);
3. persists the received replica atomically (temp file, fsync, rename,
   directory fsync) to ``storage_dir/rank_{rank}_replica_partner_{partner}.pt``
   (global ranks), overwriting the previous one.  The writer starts as soon
   as the partner's metadata is in and writes each storage as soon as its
   bytes have landed, so disk and network overlap; if the receive fails the
   temp file is removed and the previous replica file stays;
4. keeps the replica in memory (for :meth:`ReplicationStager.recover`) and
   returns it.

Every blocking send, receive and wait runs in a worker thread
(:func:`aiostage._threads.run_sync`, which never abandons its thread); the
event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed as dist

from aiostage._exceptions import AiostageError, ReplicationError
from aiostage._replicate import _transport
from aiostage._replicate._transport import KIND_RECOVER, KIND_STAGE, Channel, Encoded, MeshKey
from aiostage._stage._engine import StateDictStager
from aiostage._stage._plan import StagePlan
from aiostage._stage._stagers import _StagerBase
from aiostage._threads import run_sync, run_sync_stoppable, uncancelled

__all__ = ["ReplicationStager", "partner_of", "replica_filename"]

_NOTHING: Any = object()
_CPU = torch.device("cpu")


def partner_of(rank: int, world_size: int) -> int:
    """The partner of ``rank`` in a group of ``world_size`` ranks.

    Raises:
        ValueError: ``world_size`` is odd (every rank needs a partner).
    """
    if world_size % 2:
        raise ValueError(
            f"ReplicationStager pairs ranks, so it needs an even world size; got {world_size}"
        )
    return (rank + world_size // 2) % world_size


def replica_filename(rank: int, partner: int) -> str:
    """The file in which ``rank`` keeps its replica of ``partner``'s state."""
    return f"rank_{rank}_replica_partner_{partner}.pt"


class _Arrival:
    """Relays the transport thread's progress to the event loop.

    ``meta`` resolves once the partner's metadata is in (its storages are
    allocated, their bytes not landed yet); :meth:`wait_ready` (the persist
    writer's hook) returns once a storage's bytes have landed, and raises
    once :meth:`fail` says the receive will not finish.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.meta: asyncio.Future[_transport.Received] = loop.create_future()
        self._landed: dict[int, asyncio.Event] = {}
        self._failed = False
        self._lock = threading.Lock()
        self._pending: list[int] = []

    # -- called in the transport thread ------------------------------------

    def on_meta(self, received: _transport.Received) -> None:
        self._loop.call_soon_threadsafe(self._meta_in, received)

    def on_landed(self, storage: torch.UntypedStorage) -> None:
        # One wake-up of the loop per batch of landings, not per storage: a
        # state of thousands of small tensors would otherwise flood the loop.
        with self._lock:
            self._pending.append(storage._cdata)
            if len(self._pending) > 1:
                return
        self._loop.call_soon_threadsafe(self._landed_in)

    # -- on the loop ---------------------------------------------------------

    def _meta_in(self, received: _transport.Received) -> None:
        for storage in received.storages:
            event = asyncio.Event()
            if storage.nbytes() == 0:
                event.set()
            self._landed[storage._cdata] = event
        if not self.meta.done():
            self.meta.set_result(received)

    def _landed_in(self) -> None:
        with self._lock:
            keys, self._pending = self._pending, []
        for key in keys:
            event = self._landed.get(key)
            if event is not None:
                event.set()

    def fail(self) -> None:
        self._failed = True
        for event in self._landed.values():
            event.set()

    async def wait_ready(self, storage: torch.UntypedStorage) -> None:
        event = self._landed.get(storage._cdata)
        if event is not None:
            await event.wait()
        if self._failed:
            raise ReplicationError("receiving the partner's state failed")


class ReplicationStager(_StagerBase):
    """Stage a state and keep a replica of it on a partner rank, in memory and on disk.

    Args:
        pg: the process group to exchange over; ``None`` uses the default
            group.  CPU tensors need a group that carries them (gloo, or a
            mixed ``"cpu:gloo,cuda:nccl"`` group).  With a pure NCCL default
            group pass ``dist.new_group(backend="gloo")``, or set ``device``
            to the accelerator (each storage is then copied through a device
            buffer).  A separate group also keeps replication traffic from
            interleaving with training collectives.
        timeout: how long each send, receive or wait may take before the
            partner is declared gone (:class:`PeerTimeoutError`).  A partner
            whose process died is usually noticed at once (the connection
            drops).
        device: where the wire buffers live: CPU (default) for gloo.
        storage_dir: directory of the replica files.  ``None`` creates a
            fresh temporary directory on first use, removed again by
            :meth:`close` (so it cannot serve a restarted process: give a
            directory on persistent storage for that).  A given directory is
            created if missing and never removed.
        device_meshes: device meshes that received DTensors may live on.
            Meshes of the DTensors this rank stages are known automatically;
            list them here for :meth:`recover` from an empty state.

    Without an initialized process group, :meth:`stage` returns a CPU copy
    of its input (no exchange, no replica file), and the inherited ``save``
    writes that copy: single-process runs need no special casing.  An odd world
    size raises :class:`ValueError` (at construction when the group is
    already known, else at the first :meth:`stage`).

    The replica returned by :meth:`stage` is a fresh object each time (it is
    not overwritten by later calls).  Tensors' ``requires_grad``,
    ``nn.Parameter`` types, views sharing a storage, DTensor placements and
    ShardedTensor layouts are preserved.  Non-tensor leaves travel pickled
    and are unpickled with a restricted unpickler (containers, atomic
    values, torch dtypes/sizes/devices, and classes registered with
    ``torch.serialization.add_safe_globals``); anything else is refused
    with a :class:`ReplicationError` naming it.

    Memory: the CPU staging copy is cached and refreshed in place across
    calls (about one state's worth), and the last replica (about one
    partner state's worth) is kept for :meth:`recover`; :meth:`close`
    drops both.

    ``stage()`` is point-to-point within each pair, not a collective: every
    rank of the group calls it, in the same order as its partner.  The
    inherited ``save(state, path)`` and ``persist(staged, path)`` write what
    ``stage`` returns, that is the partner's replica.
    """

    def __init__(
        self,
        pg: dist.ProcessGroup | None = None,
        timeout: timedelta = timedelta(minutes=30),
        device: torch.device | str = _CPU,
        storage_dir: str | Path | None = None,
        *,
        device_meshes: Sequence[Any] = (),
    ) -> None:
        super().__init__()
        if timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._pg = pg
        self.timeout = timeout
        self.device = torch.device(device)
        self._given_dir = Path(storage_dir) if storage_dir is not None else None
        self._temp_dir: Path | None = None
        self._temp_cleanup: weakref.finalize[Any, Any] | None = None
        self._engine = StateDictStager()
        self._replica: Any = _NOTHING
        self._meshes: dict[MeshKey, Any] = {}
        for mesh in device_meshes:
            self._meshes[_transport.mesh_key(mesh)] = mesh
        self._broken: str | None = None
        group = self._group(None)
        if group is not None:
            self._pair(group)

    # -- group and pairing ---------------------------------------------------

    def _group(self, pg: Any) -> Any:
        if pg is not None:
            return pg
        if self._pg is not None:
            return self._pg
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.group.WORLD

    def _pair(self, group: Any) -> tuple[int, int, int, int]:
        """(my group rank, partner group rank, my global rank, partner global rank)."""
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        if rank < 0:
            raise ValueError("this process is not a member of the replication process group")
        peer = partner_of(rank, world)
        if self.device.type == "cpu":
            backend = str(dist.get_backend(group)).lower()
            if "gloo" not in backend and "mpi" not in backend and "cpu" not in backend:
                raise ValueError(
                    f"the replication group's backend {backend!r} cannot carry CPU tensors; "
                    'pass a gloo group (dist.new_group(backend="gloo")) or device=<accelerator>'
                )
        return rank, peer, _transport.global_rank(group, rank), _transport.global_rank(group, peer)

    # -- paths -----------------------------------------------------------------

    @property
    def storage_dir(self) -> Path | None:
        """The directory of the replica files (``None`` until a temp dir is made)."""
        return self._given_dir if self._given_dir is not None else self._temp_dir

    def _ensure_dir(self) -> Path:
        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            return self._given_dir
        if self._temp_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="aiostage-replica-"))
            self._temp_cleanup = weakref.finalize(
                self, shutil.rmtree, str(self._temp_dir), ignore_errors=True
            )
        return self._temp_dir

    # -- staging ---------------------------------------------------------------

    def _check_channel(self, pg: Any) -> None:
        if self._broken is not None and pg is None:
            raise ReplicationError(
                f"an earlier exchange failed ({self._broken}); the channel with the partner "
                "is out of step: create a new process group (and stager), or pass the new "
                "group to recover(pg=...)"
            )

    async def _stage_locked(
        self, state_dict: Any, on_plan: Callable[[StagePlan], None] | None
    ) -> Any:
        group = self._group(None)
        if group is None:
            # No partner: a CPU copy (never the live state), so that save()'s
            # writer, started below, reads a snapshot the caller cannot change.
            staged = await run_sync(self._engine.stage, state_dict)
            if on_plan is not None:
                on_plan(StagePlan(staged, [], []))
            return staged
        rank, peer, me_global, peer_global = self._pair(group)
        self._check_channel(None)
        try:
            staged = await run_sync(self._engine.stage, state_dict)
            enc = await run_sync(_transport.encode, staged)
        except Exception:
            # Keep the pair in step: tell the partner, which then fails at
            # once instead of waiting out its timeout.
            with contextlib.suppress(ReplicationError):
                await self._exchange(group, rank, peer, peer_global, KIND_STAGE, None, failed=True)
            raise
        self._meshes.update(enc.meshes)
        path = self._ensure_dir() / replica_filename(me_global, peer_global)
        replica = await self._receive_and_persist(group, rank, peer, peer_global, enc, path)
        self._replica = replica
        if on_plan is not None:
            on_plan(StagePlan(replica, [], []))
        return replica

    async def _receive_and_persist(
        self, group: Any, rank: int, peer: int, peer_global: int, enc: Encoded, path: Path
    ) -> Any:
        """Exchange, and write the partner's storages to ``path`` as they land."""
        from aiostage._persist._writer import persist

        arrival = _Arrival(asyncio.get_running_loop())
        exchange = asyncio.ensure_future(
            self._exchange(group, rank, peer, peer_global, KIND_STAGE, enc, arrival=arrival)
        )
        writer: asyncio.Future[Path] | None = None
        try:
            await asyncio.wait([exchange, arrival.meta], return_when=asyncio.FIRST_COMPLETED)
            # The metadata, or the end of an exchange that carried none.
            got = arrival.meta.result() if arrival.meta.done() else exchange.result()
            if got.kind != KIND_STAGE or got.meta is None:
                await exchange
                raise ReplicationError(
                    "the partner failed to stage its state (see its own error)"
                    if got.failed
                    else "the partner is not staging (it called recover())",
                    peer=peer_global,
                )
            # The skeleton can be built before any bytes land; the writer then
            # takes each storage as soon as it has arrived.
            replica = await self._decode(got.meta, got.storages)
            writer = asyncio.ensure_future(persist(replica, path, wait_ready=arrival.wait_ready))
            await exchange
            await writer
        except BaseException as exc:
            was_cancelled = isinstance(exc, asyncio.CancelledError)

            async def unwind() -> None:
                if was_cancelled:
                    exchange.cancel()
                # Otherwise (a bad message, a decode error) the exchange runs
                # to its end, so the partner is not left waiting.
                await asyncio.wait([exchange])
                arrival.fail()
                if writer is not None:
                    if not writer.done():
                        writer.cancel()
                    await asyncio.wait([writer])

            await uncancelled(unwind())
            for fut in (exchange, writer):
                if fut is not None and fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: the first error is the one raised
            raise
        return replica

    async def _decode(self, meta: bytes, storages: list[torch.UntypedStorage]) -> Any:
        """Rebuild a received state (in a worker thread) on this rank's meshes.

        Cancellation: the decode in its thread finishes; then it re-raises.
        """
        decode = functools.partial(
            _transport.decode,
            meta,
            storages,
            meshes=dict(self._meshes),
            default_pg=dist.group.WORLD,
        )
        return await run_sync(decode)

    async def _exchange(
        self,
        group: Any,
        rank: int,
        peer: int,
        peer_global: int,
        kind: int,
        enc: Encoded | None,
        *,
        mark_broken: bool = True,
        arrival: _Arrival | None = None,
        failed: bool = False,
    ) -> _transport.Received:
        """Send ``enc`` to the partner and receive its message, in a worker thread."""
        channel = Channel(group, peer, peer_global, self.timeout, self.device)
        on_meta = arrival.on_meta if arrival is not None else None
        on_landed = arrival.on_landed if arrival is not None else None

        def run(cancel: threading.Event) -> _transport.Received:
            if rank < peer:
                channel.send(kind, enc, cancel, failed=failed)
                return channel.recv(cancel, on_meta=on_meta, on_landed=on_landed)
            got = channel.recv(cancel, on_meta=on_meta, on_landed=on_landed)
            channel.send(kind, enc, cancel, failed=failed)
            return got

        try:
            # Cancelled, the thread stops after the operation in flight
            # (bounded by the timeout) and is waited for: it never outlives
            # the call.
            return await run_sync_stoppable(run)
        except BaseException as exc:
            if mark_broken:
                self._broken = f"{type(exc).__name__}: {exc}"
            raise

    # -- recovery --------------------------------------------------------------

    async def _held(self, me_global: int, peer_global: int) -> Any:
        """What this rank holds of its partner: in memory, else its replica file."""
        if self._replica is not _NOTHING:
            return self._replica
        directory = self.storage_dir
        if directory is None:
            return _NOTHING
        path = directory / replica_filename(me_global, peer_global)
        if not await anyio.Path(path).exists():
            return _NOTHING
        from aiostage._load._reader import load

        try:
            return await load(path, verify=True)
        except AiostageError as exc:
            warnings.warn(
                f"aiostage: not serving the replica file {path} ({exc}); "
                "telling the partner this rank holds nothing",
                RuntimeWarning,
                stacklevel=2,
            )
            return _NOTHING

    async def recover(self, *, pg: dist.ProcessGroup | None = None) -> Any:
        """Get this rank's own state back from its partner's memory.

        Both ranks of a pair call ``recover()`` (other pairs need not).  Each
        sends what it holds of its partner: the replica received by its last
        :meth:`stage`, or, in a restarted process, its replica file in
        ``storage_dir`` if there is one (read with :func:`aiostage.load`,
        CRC-checked and ``weights_only``: a file holding ShardedTensors is
        not served this way and a warning says so); each receives its own state
        back.
        Typical use after rank ``r`` restarted with an empty state::

            # on r and on its partner
            mine = await stager.recover()
            if mine is not None:
                model.load_state_dict(mine["model"])

        Returns:
            This rank's state as its partner held it (with fresh storages),
            or ``None`` when the partner holds nothing of this rank.

        Args:
            pg: exchange over this group instead of the stager's (for
                example a group re-created after a restart).

        Raises:
            ValueError: odd world size, or no process group.
            PeerTimeoutError: the partner did not answer within the timeout.
            ReplicationError: the partner called :meth:`stage` instead, or
                its metadata could not be decoded.

        Cancellation: no new send or receive starts; the one in flight is
        waited for (at most ``timeout``).  The pair is then out of step: the
        partner sees a :class:`PeerTimeoutError`, and this stager refuses
        further exchanges on its group (pass a fresh group with ``pg=``).
        """
        await self._acquire()
        try:
            group = self._group(pg)
            if group is None:
                raise ValueError("recover() needs an initialized process group")
            rank, peer, me_global, peer_global = self._pair(group)
            self._check_channel(pg)
            enc = None
            try:
                held = await self._held(me_global, peer_global)
                if held is not _NOTHING:
                    enc = await run_sync(_transport.encode, held)
                    self._meshes.update(enc.meshes)
            except Exception:
                with contextlib.suppress(ReplicationError):
                    await self._exchange(
                        group,
                        rank,
                        peer,
                        peer_global,
                        KIND_RECOVER,
                        None,
                        failed=True,
                        mark_broken=pg is None,
                    )
                raise
            got = await self._exchange(
                group, rank, peer, peer_global, KIND_RECOVER, enc, mark_broken=pg is None
            )
            if got.kind != KIND_RECOVER:
                raise ReplicationError(
                    "the partner is staging, not recovering: both ranks of a pair must call "
                    "recover()",
                    peer=peer_global,
                )
            if got.failed:
                raise ReplicationError(
                    "the partner failed to send what it holds (see its own error)",
                    peer=peer_global,
                )
            if got.meta is None:
                return None
            return await self._decode(got.meta, got.storages)
        finally:
            self._turn.release()

    @property
    def replica(self) -> Any:
        """The partner's state from the last :meth:`stage`, or ``None``."""
        return None if self._replica is _NOTHING else self._replica

    # -- closing ---------------------------------------------------------------

    def _release_buffers(self) -> None:
        self._engine.close()
        self._replica = _NOTHING

    async def close(self) -> None:
        """Wait for an exchange in flight, drop the buffers and the replica.

        A temporary ``storage_dir`` (``storage_dir=None``) is removed with its
        replica file; a given directory and its file are kept.  Idempotent.

        Cancellation: close is shielded; it finishes even if cancelled.
        """
        await super().close()
        cleanup = self._temp_cleanup
        if cleanup is not None and cleanup.alive:
            await run_sync(cleanup)

    async def stage(self, state_dict: Any) -> Any:
        """Stage ``state_dict`` to CPU, swap it with the partner rank, persist the replica.

        Returns the partner's state (this rank's replica of it), once it is
        durable in ``storage_dir``.  ``state_dict`` may be mutated as soon
        as this returns.  Without an initialized process group, returns a CPU
        copy of ``state_dict`` (in this stager's cached buffers, refreshed by
        the next call) and nothing is exchanged or written.

        Raises:
            ValueError: odd world size, or a group that cannot carry CPU
                tensors.
            StagingError: an object in the state cannot be staged.
            PeerTimeoutError: the partner did not answer within the timeout
                (or its connection dropped); names the partner rank.
            ReplicationError: the state cannot be encoded, the partner's
                cannot be decoded, the partner failed to stage its own state
                (it raises its own error; the pair stays in step), or the
                partner called :meth:`recover` instead.
            PersistError: writing the replica file failed.
            StagerClosedError: the stager was closed.

        Cancellation: no new send or receive starts; the one in flight is
        waited for (at most ``timeout``), so no worker thread outlives the
        call.  The pair is then out of step: the partner sees a
        :class:`PeerTimeoutError` and this stager refuses further exchanges
        on its group.  The replica file being written (the write overlaps
        the receive) is abandoned: its temp file is removed and the previous
        replica file stays in place.
        """
        return await super().stage(state_dict)
