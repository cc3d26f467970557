"""DTensor and ShardedTensor leaves keep their specs across the exchange."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _distributed import run_group

from aiostage import ReplicationStager
from aiostage._replicate._stager import partner_of, replica_filename


def _local(rank: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(*shape, generator=g)


def _make(rank: int, world: int, mesh: Any) -> dict[str, Any]:
    from torch.distributed._shard.sharded_tensor import empty as sharded_empty
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec
    from torch.distributed.tensor import DTensor, Replicate, Shard

    sharded_local = _local(rank, (2, 3), 1)
    replicated = _local(0, (3, 2), 2)  # the same on every rank
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world)])
    st = sharded_empty(spec, 2 * world, 5)
    with torch.no_grad():
        st.local_shards()[0].tensor.copy_(_local(rank, (2, 5), 3))
    dt_shard = DTensor.from_local(sharded_local, mesh, [Shard(0)], run_check=False)
    return {
        "shard": dt_shard,
        "replicate": DTensor.from_local(replicated, mesh, [Replicate()], run_check=False),
        "sharded_tensor": st,
        "plain": _local(rank, (4,), 4),
        "again": dt_shard,
    }


def _check(got: dict[str, Any], expected: dict[str, Any], mesh: Any, owner: int) -> None:
    """``got`` must be ``owner``'s state (``expected`` was built for it on this rank)."""
    from torch.distributed.tensor import DTensor

    for key in ("shard", "replicate"):
        a, e = got[key], expected[key]
        assert isinstance(a, DTensor), key
        assert a.placements == e.placements, key
        assert a.device_mesh is mesh, key  # rebuilt on this rank's own mesh
        assert a.shape == e.shape and a.stride() == e.stride() and a.dtype == e.dtype, key
        assert torch.equal(a.to_local(), e.to_local()), key
    assert got["again"] is got["shard"]
    st, est = got["sharded_tensor"], expected["sharded_tensor"]
    assert type(st) is type(est)
    assert st.metadata() == est.metadata()
    assert st.size() == est.size()
    (shard,) = st.local_shards()
    # The owner's shard, with the owner's placement, on this rank.
    assert shard.metadata == est.metadata().shards_metadata[owner]
    assert str(shard.metadata.placement) == f"rank:{owner}/cpu"
    assert torch.equal(shard.tensor, _local(owner, (2, 5), 3))
    assert torch.equal(got["plain"], expected["plain"])


async def _worker(rank: int, world: int, storage_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    peer = partner_of(rank, world)
    stager = ReplicationStager(timeout=timedelta(seconds=30), storage_dir=storage_dir)
    async with stager:
        replica = await stager.stage(_make(rank, world, mesh))
        _check(replica, _make(peer, world, mesh), mesh, peer)
        # The persisted replica holds the same (DTensor/ShardedTensor need weights_only=False).
        path = Path(storage_dir) / replica_filename(rank, peer)
        on_disk = torch.load(path, weights_only=False)
        assert torch.equal(on_disk["plain"], _make(peer, world, mesh)["plain"])
        local = on_disk["shard"].to_local()
        assert torch.equal(local, _make(peer, world, mesh)["shard"].to_local())
        # DTensors alone load weights_only (torch allow-lists their classes),
        # through aiostage.load's own record reader.
        only_dtensor = Path(storage_dir) / f"dtensor_{rank}.pt"
        torch.save({"shard": on_disk["shard"]}, only_dtensor)
        loaded = await aiostage.load(only_dtensor)
        assert type(loaded["shard"]) is type(on_disk["shard"])
        assert loaded["shard"].placements == on_disk["shard"].placements
        assert torch.equal(loaded["shard"].to_local(), local)
        # Rank 0 "restarts": a fresh stager that has seen no DTensor (it is told the
        # mesh) gets its state back from the partner's memory.
        if rank == 0:
            async with ReplicationStager(
                timeout=timedelta(seconds=30),
                storage_dir=Path(storage_dir) / "fresh",
                device_meshes=[mesh],
            ) as fresh:
                mine = await fresh.recover()
            _check(mine, _make(rank, world, mesh), mesh, rank)
        elif rank == partner_of(0, world):
            assert await stager.recover() is None


@pytest.mark.timeout(60)
def test_dtensor_and_sharded_tensor_round_trip(tmp_path: Path) -> None:
    run_group(_worker, 2, str(tmp_path), timeout=50)
