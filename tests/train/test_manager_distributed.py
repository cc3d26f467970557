"""Two ranks on gloo over loopback: a step commits only once every rank's file is durable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from _distributed import run_group


async def _worker(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from aiostage import CheckpointManager, get_state, set_state

    torch.manual_seed(rank)  # DDP broadcasts rank 0's weights at construction
    model = DistributedDataParallel(torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # A group of its own: the manager's collectives run on a worker thread
    # while DDP's all-reduces run on the training thread.
    group = dist.new_group(backend="gloo")
    mgr = CheckpointManager(directory, keep_last=2, process_group=group)
    out: dict[str, Any] = {"rank": mgr.rank, "world_size": mgr.world_size}

    def extra(step: int) -> dict[str, Any]:
        return {"step": step, "rank": rank, "mine": torch.full((3,), float(rank))}

    for step in (1, 2, 3):
        model(torch.randn(4, 8) + rank).sum().backward()
        opt.step()
        opt.zero_grad()
        await mgr.save(step, get_state(model, opt, extra=extra(step)))
    await mgr.wait()
    out["steps"] = mgr.steps()

    # Rank 1's write fails: step 4 must not be committed on either rank.
    def fail_on_rank1(done: int, total: int) -> None:
        if rank == 1:
            raise RuntimeError("rank 1: disk on fire")

    await mgr.save(4, get_state(model, opt, extra=extra(4)), progress=fail_on_rank1)
    try:
        await mgr.wait()
        out["error"] = None
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["steps_after_failure"] = mgr.steps()

    restored = await mgr.restore()
    plain = torch.nn.Linear(8, 4)  # restores into the unwrapped model
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    got = set_state(plain, plain_opt, restored)
    out["restored_step"] = got["step"]
    out["restored_rank"] = got["rank"]
    out["restored_mine"] = got["mine"].tolist()
    out["params_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(plain.parameters(), model.module.parameters(), strict=True)
    )
    out["momentum_equal"] = all(
        torch.equal(plain_opt.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"])
        for a, b in zip(plain.parameters(), model.parameters(), strict=True)
    )
    out["leftover_before"] = await anyio.Path(directory, "step_000000004").is_dir()
    dist.barrier()  # every rank has looked at the leftover before step 5 cleans it

    await mgr.save(5, get_state(model, opt, extra=extra(5)))

    # Rank 1 cannot even stage step 6 (a meta tensor): save raises there at
    # once, and rank 0, which wrote its file, learns that step 6 failed.
    bad = torch.empty(3, device="meta") if rank == 1 else torch.zeros(3)
    try:
        await mgr.save(6, {"w": bad})
        await mgr.wait()
        out["error6"] = None
    except Exception as exc:
        out["error6"] = f"{type(exc).__name__}: {exc}"
    await mgr.save(7, get_state(model, opt, extra=extra(7)))
    await mgr.close()
    out["final_steps"] = mgr.steps()

    # Without a group, a manager makes its own over the initialized world.
    auto = CheckpointManager(os.path.join(directory, "auto"))
    out["auto"] = (auto.rank, auto.world_size)
    await auto.save(0, {"rank": torch.tensor(rank)})
    out["auto_restored"] = int((await auto.restore())["rank"])
    await auto.close()
    out["auto_steps"] = auto.steps()
    return out


@pytest.mark.slow
def test_two_ranks_commit_together(tmp_path: Path) -> None:
    results = run_group(_worker, 2, str(tmp_path), timeout=90, pg_timeout_s=60)
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world_size"] == 2
        assert res["steps"] == [2, 3]
        assert res["steps_after_failure"] == [2, 3]
        assert res["restored_step"] == 3
        assert res["restored_rank"] == rank  # each rank gets its own state back
        assert res["restored_mine"] == [float(rank)] * 3
        assert res["params_equal"] and res["momentum_equal"]
        assert res["leftover_before"]
        assert res["final_steps"] == [5, 7]
        assert res["auto"] == (rank, 2)
        assert res["auto_restored"] == rank and res["auto_steps"] == [0]
    assert results[1]["error"] == "RuntimeError: rank 1: disk on fire"
    assert results[0]["error"] is not None
    assert results[0]["error"].startswith("CheckpointManagerError: step 4 was not committed")
    assert "rank 1" in results[0]["error"]
    assert results[1]["error6"].startswith("StagingError: ")
    assert results[0]["error6"].startswith("CheckpointManagerError: step 6 was not committed")
    for step in (5, 7):
        sdir = tmp_path / f"step_{step:09d}"
        names = sorted(os.listdir(sdir))
        assert names[0] == "manifest.json"
        assert [n[:10] for n in names[1:]] == ["rank_00000", "rank_00001"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000005", "step_000000007"]
