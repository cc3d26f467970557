"""ReplicationStager round trips over real gloo groups (2 and 4 processes)."""

from __future__ import annotations

import collections
import fractions
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _distributed import run_group

import aiostage
from aiostage import ReplicationStager
from aiostage._replicate import _transport
from aiostage._replicate._stager import partner_of, replica_filename

pytestmark = pytest.mark.timeout(60)


def make_state(rank: int) -> dict[str, Any]:
    """A state exercising views, dtypes, identity and non-tensor leaves."""
    g = torch.Generator().manual_seed(1000 + rank)
    base = torch.randn(6, 4, generator=g)
    weight = torch.nn.Parameter(torch.randn(3, 3, generator=g))
    shared = torch.arange(10, dtype=torch.int64) + rank
    return {
        "base": base,
        "row": base[2],  # a view: shares base's storage
        "col_t": base.t()[1:3],  # a non-contiguous view of the same storage
        "weight": weight,
        "dtypes": {
            "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
            "f16": torch.randn(2, 3, generator=g).to(torch.float16),
            "f64": torch.randn(4, generator=g, dtype=torch.float64),
            "i8": torch.tensor([-1, 2, -3], dtype=torch.int8),
            "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "c64": torch.randn(3, generator=g, dtype=torch.complex64),
            "scalar": torch.tensor(3.5 + rank),
            "empty": torch.empty(0, 3),
        },
        "same": [shared, shared],  # one tensor object twice
        "narrow": shared[3:7],
        "step": 17 + rank,
        "lr": 0.125,
        "name": f"rank{rank}",
        "flag": None,
        "nested": collections.OrderedDict(a=(1, 2.5, "x"), b=[b"bytes", {3, 4}]),
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
    }


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert type(actual) is type(expected), path
        assert actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert actual.stride() == expected.stride(), path
        assert actual.storage_offset() == expected.storage_offset(), path
        assert actual.requires_grad == expected.requires_grad, path
        assert actual.device.type == "cpu", path
        assert torch.equal(actual.detach(), expected.detach()), path
    elif isinstance(expected, dict):
        assert type(actual) is type(expected) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}.{i}")
    else:
        assert actual == expected and type(actual) is type(expected), path


def check_sharing(state: dict[str, Any]) -> None:
    """Views arrive on their base's storage; a repeated tensor is one object."""
    ptr = state["base"].untyped_storage().data_ptr()
    assert state["row"].untyped_storage().data_ptr() == ptr
    assert state["col_t"].untyped_storage().data_ptr() == ptr
    assert state["same"][0] is state["same"][1]
    assert (
        state["narrow"].untyped_storage().data_ptr()
        == state["same"][0].untyped_storage().data_ptr()
    )
    assert state["base"].untyped_storage().nbytes() == 6 * 4 * 4


def own_files(storage_dir: str, rank: int) -> list[str]:
    return sorted(p.name for p in Path(storage_dir).iterdir() if f"rank_{rank}_" in p.name)


async def _exchange_worker(rank: int, world: int, storage_dir: str) -> float:
    peer = partner_of(rank, world)
    state = make_state(rank)
    async with ReplicationStager(timeout=timedelta(seconds=30), storage_dir=storage_dir) as stager:
        replica = await stager.stage(state)
        # The input may be mutated once stage() returned: the replica is not affected.
        with torch.no_grad():
            for t in (state["base"], state["weight"], state["same"][0]):
                t.add_(1000)
        expected = make_state(peer)
        assert_same(replica, expected)
        check_sharing(replica)
        assert stager.replica is replica

        path = Path(storage_dir) / replica_filename(rank, peer)
        on_disk = torch.load(path, weights_only=True)
        assert_same(on_disk, expected)
        check_sharing(on_disk)

        # A second stage overwrites the same file, atomically.
        state2 = {"step": 100 + rank, "w": torch.full((4,), float(rank))}
        replica2 = await stager.stage(state2)
        assert replica2["step"] == 100 + peer and torch.equal(
            replica2["w"], torch.full((4,), float(peer))
        )
        assert torch.equal(torch.load(path, weights_only=True)["w"], replica2["w"])
        assert own_files(storage_dir, rank) == [path.name]
        # The first replica is a separate object: not overwritten by the second call.
        assert_same(replica, expected)
    return 0.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 4])
def test_exchange_round_trip(world: int, tmp_path: Path) -> None:
    run_group(_exchange_worker, world, str(tmp_path), timeout=50)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(replica_filename(r, partner_of(r, world)) for r in range(world))


async def _recover_worker(rank: int, world: int, storage_dir: str, restarted: int) -> None:
    peer = partner_of(rank, world)
    group_dir = Path(storage_dir) / "shared"
    async with ReplicationStager(timeout=timedelta(seconds=30), storage_dir=group_dir) as stager:
        await stager.stage(make_state(rank))
    # The stagers are closed; the files stay.  Now `restarted` comes back with an
    # empty state and no memory; its partner keeps a stager holding the replica.
    survivor = partner_of(restarted, world)
    if rank == restarted:
        fresh_dir = Path(storage_dir) / f"fresh{rank}"  # nothing of the old run in it
        async with ReplicationStager(timeout=timedelta(seconds=30), storage_dir=fresh_dir) as new:
            assert new.replica is None
            mine = await new.recover()
        assert_same(mine, make_state(rank))
        check_sharing(mine)
        # The same state, from the partner's file (no live partner needed).
        from_file = await aiostage.load_replica(group_dir, rank)
        assert_same(from_file, make_state(rank))
        check_sharing(from_file)
        assert aiostage.find_replica(group_dir, rank).name == replica_filename(peer, rank)
    elif rank == survivor:
        # A new process on the survivor's side would find the replica in its file;
        # here the survivor also restarts its stager (memory gone) and serves the
        # replica from storage_dir.
        async with ReplicationStager(timeout=timedelta(seconds=30), storage_dir=group_dir) as again:
            got = await again.recover()
        assert got is None  # the restarted rank held nothing of the survivor


@pytest.mark.timeout(60)
def test_recover_after_restart(tmp_path: Path) -> None:
    run_group(_recover_worker, 2, str(tmp_path), 0, timeout=50)


async def _recover_memory_worker(rank: int, world: int) -> None:
    async with ReplicationStager(timeout=timedelta(seconds=30)) as stager:
        await stager.stage(make_state(rank))
        if rank == 1:
            async with ReplicationStager(timeout=timedelta(seconds=30)) as new:
                mine = await new.recover()
            assert_same(mine, make_state(rank))
            check_sharing(mine)
        else:
            got = await stager.recover()  # serves from memory
            assert got is None
        # One rank stages while the other recovers: both are told, nobody hangs.
        with pytest.raises(aiostage.ReplicationError, match=r"both ranks of a pair|not staging"):
            if rank == 0:
                await stager.stage(make_state(rank))
            else:
                await stager.recover()


@pytest.mark.timeout(60)
def test_recover_from_partner_memory() -> None:
    run_group(_recover_memory_worker, 2, timeout=50)


async def test_stage_without_process_group_returns_a_cpu_copy() -> None:
    state = make_state(0)
    async with ReplicationStager() as stager:
        out = await stager.stage(state)
        assert out is not state
        assert_same(out, state)

        def ptr(t: torch.Tensor) -> int:
            return t.untyped_storage().data_ptr()

        assert ptr(out["base"]) != ptr(state["base"])
        assert ptr(out["row"]) == ptr(out["base"])  # views still share their storage
        state["base"].add_(1.0)  # the copy is a snapshot
        assert not torch.equal(out["base"], state["base"])
        assert stager.storage_dir is None  # nothing exchanged, nothing written
    with pytest.raises(aiostage.StagerClosedError):
        await stager.stage(state)


async def test_save_without_process_group_writes_the_state_as_staged(tmp_path: Path) -> None:
    # save() returns once staged: mutating the state right away (before the
    # background writer has run at all) must not reach the file.
    state = {"w": torch.arange(1 << 16, dtype=torch.float32), "step": 3}
    expected = state["w"].clone()
    async with ReplicationStager() as stager:
        handle = await stager.save(state, tmp_path / "ckpt.pt")
        state["w"].fill_(-1.0)
        state["step"] = 4
        path = await handle.wait()
    loaded = await aiostage.load(path, verify=True)
    assert torch.equal(loaded["w"], expected)
    assert loaded["step"] == 3


def test_encode_decode_in_process() -> None:
    state = make_state(3)
    enc = _transport.encode(state)
    # Unique storages only: base, shared, weight and one per dtype entry.
    assert len(enc.storages) == 3 + len(state["dtypes"])
    storages = [torch.UntypedStorage(s.nbytes()) for s in enc.storages]
    for dst, src in zip(storages, enc.storages, strict=True):
        dst.copy_(src)
    out = _transport.decode(enc.meta, storages)
    assert_same(out, state)
    check_sharing(out)


def test_restricted_unpickler_refuses_unknown_globals() -> None:
    enc = _transport.encode({"fn": print, "x": collections.Counter("ab")})
    with pytest.raises(aiostage.ReplicationError, match=r"builtins\.print"):
        _transport.decode(enc.meta, [])


async def test_load_replica_checks_the_file(tmp_path: Path) -> None:
    state = make_state(1)
    with pytest.raises(aiostage.ReplicationError, match="no replica of rank 1"):
        await aiostage.load_replica(tmp_path, 1)
    path = await aiostage.persist(state, tmp_path / replica_filename(0, 1))
    loaded = await aiostage.load_replica(tmp_path, 1)
    assert_same(loaded, state)
    check_sharing(loaded)
    # Flip one byte of the largest storage record: the CRC check catches it.
    data = bytearray(path.read_bytes())
    marker = state["base"].numpy().tobytes()[:16]
    at = data.find(marker)
    assert at > 0
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(aiostage.CorruptCheckpointError):
        await aiostage.load_replica(tmp_path, 1)


async def test_load_replica_trusted_still_checks_the_crcs(tmp_path: Path) -> None:
    # A class torch does not allow-list: only weights_only=False loads it.
    state = {"base": torch.arange(4096.0), "lr": fractions.Fraction(1, 3)}
    path = await aiostage.persist(state, tmp_path / replica_filename(0, 1))
    with pytest.raises(aiostage.UnsafeCheckpointError, match="Fraction"):
        await aiostage.load_replica(tmp_path, 1)
    loaded = await aiostage.load_replica(tmp_path, 1, weights_only=False)
    assert loaded["lr"] == fractions.Fraction(1, 3)
    assert torch.equal(loaded["base"], state["base"])
    data = bytearray(path.read_bytes())
    at = data.find(state["base"].numpy().tobytes()[8:24])
    assert at > 0
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(aiostage.CorruptCheckpointError) as caught:
        await aiostage.load_replica(tmp_path, 1, weights_only=False)
    assert caught.value.record is not None and caught.value.record.endswith("data/0")
    # verify=False is the caller's choice to skip the check.
    unchecked = await aiostage.load_replica(tmp_path, 1, weights_only=False, verify=False)
    assert not torch.equal(unchecked["base"], state["base"])


def test_encode_decode_keeps_conj_neg_attributes_and_parameters() -> None:
    c = torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    tagged = torch.arange(4.0)
    tagged.note = {"inner": torch.ones(2), "n": 3}  # type: ignore[attr-defined]
    state = {
        "conj": c.conj(),
        "neg": torch.arange(3.0)._neg_view(),
        "param": torch.nn.Parameter(torch.ones(2)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "tagged": tagged,
    }
    enc = _transport.encode(state)
    out = _transport.decode(enc.meta, [s.clone() for s in enc.storages])
    assert out["conj"].is_conj() and torch.equal(
        out["conj"].resolve_conj(), c.conj().resolve_conj()
    )
    assert out["neg"].is_neg() and torch.equal(out["neg"], state["neg"])
    assert type(out["param"]) is torch.nn.Parameter and out["param"].requires_grad
    assert type(out["frozen"]) is torch.nn.Parameter and not out["frozen"].requires_grad
    assert out["tagged"].note["n"] == 3 and torch.equal(out["tagged"].note["inner"], torch.ones(2))


async def _subgroup_worker(rank: int, world: int, storage_dir: str) -> None:
    import torch.distributed as dist

    # Two gloo subgroups, {0, 1} and {2, 3}: inside each, group ranks 0 and 1
    # pair up, so global rank 2 pairs with 3 (not with 0 as in the world).
    groups = [dist.new_group([0, 1], backend="gloo"), dist.new_group([2, 3], backend="gloo")]
    mine = groups[rank // 2]
    peer = rank ^ 1
    async with ReplicationStager(pg=mine, storage_dir=storage_dir) as stager:
        replica = await stager.stage(make_state(rank))
    assert_same(replica, make_state(peer))
    assert own_files(storage_dir, rank) == [replica_filename(rank, peer)]  # global ranks


def test_exchange_over_a_subgroup_uses_group_ranks(tmp_path: Path) -> None:
    run_group(_subgroup_worker, 4, str(tmp_path), timeout=50)
