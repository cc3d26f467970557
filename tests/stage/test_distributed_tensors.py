"""DTensor and ShardedTensor leaves stage with their specs (gloo, 2 processes)."""

from __future__ import annotations

import pytest
from _distributed import run_group


async def _stage_dtensors(rank: int, world_size: int) -> str:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from aiostage import DefaultStager, StateDictStager

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    sd = {
        "sharded": distribute_tensor(full, mesh, [Shard(0)]),
        "replicated": distribute_tensor(full * 2, mesh, [Replicate()]),
    }
    for staged in (StateDictStager().stage(sd), await DefaultStager().stage(sd)):
        for key, src in sd.items():
            out = staged[key]
            assert isinstance(out, DTensor), key
            assert out.device_mesh == src.device_mesh, key
            assert out.placements == src.placements, key
            assert out.shape == src.shape and out.stride() == src.stride(), key
            local, src_local = out.to_local(), src.to_local()
            assert local.device.type == "cpu"
            assert torch.equal(local, src_local), key
            assert local.untyped_storage().data_ptr() != src_local.untyped_storage().data_ptr()
        # The staged copy is independent of later training steps.
        before = staged["sharded"].to_local().clone()
    sd["sharded"].to_local().add_(1)
    assert torch.equal(staged["sharded"].to_local(), before)
    return "ok"


def _stage_sharded_tensor(rank: int, world_size: int) -> str:
    import torch
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    from aiostage import StateDictStager

    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world_size)])
    st = sharded_tensor.rand(spec, 8, 4)
    staged = StateDictStager().stage({"st": st})["st"]
    assert isinstance(staged, ShardedTensor)
    assert staged.metadata() == st.metadata()
    (shard,) = staged.local_shards()
    (src_shard,) = st.local_shards()
    assert shard.metadata == src_shard.metadata
    assert torch.equal(shard.tensor, src_shard.tensor)
    assert shard.tensor.data_ptr() != src_shard.tensor.data_ptr()
    return "ok"


@pytest.mark.slow
def test_dtensor_stages_with_mesh_and_placements() -> None:
    assert run_group(_stage_dtensors, 2, timeout=120) == ["ok", "ok"]


@pytest.mark.slow
def test_sharded_tensor_local_shards_stage() -> None:
    assert run_group(_stage_sharded_tensor, 2, timeout=120) == ["ok", "ok"]
