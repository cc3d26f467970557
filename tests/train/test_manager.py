"""CheckpointManager: commit order, rotation, interrupted saves, background errors, SIGKILL."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiofiles
import anyio
import pytest
import torch

import aiostage
from aiostage import CheckpointManager, CheckpointManagerError, PersistError, SaveHandle
from aiostage._train import _manifest as mf

REPO = Path(__file__).resolve().parents[2]


def state(step: int, numel: int = 1000) -> dict[str, Any]:
    return {"w": torch.full((numel,), float(step)), "extra": {"step": step}}


def step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step_"))


class GatedStager:
    """A stager whose writes stop before the first storage until ``gate`` is set.

    Built on the public pieces (``DefaultStager.stage``, ``aiostage.persist``
    with ``wait_ready``, ``SaveHandle``), so a test can observe and act while
    a save is really in the middle of persisting.
    """

    def __init__(self) -> None:
        self.inner = aiostage.DefaultStager()
        self.gate = asyncio.Event()
        self.blocked = asyncio.Event()
        self.paths: list[Path] = []

    async def save(self, state_dict: Any, path: Any, *, progress: Any = None) -> SaveHandle:
        staged = await self.inner.stage(state_dict)

        async def ready(_storage: torch.UntypedStorage) -> None:
            self.blocked.set()
            await self.gate.wait()

        self.paths.append(Path(path))
        task = asyncio.create_task(
            aiostage.persist(staged, path, wait_ready=ready, progress=progress)
        )
        return SaveHandle(task, staged=staged)

    async def close(self) -> None:
        await self.inner.close()


async def test_save_restore_and_rotation(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, keep_last=2) as mgr:
        assert mgr.steps() == []
        with pytest.raises(CheckpointManagerError):
            await mgr.restore()
        for step in (10, 20, 30, 40):
            stats = await mgr.save(step, state(step))
            assert stats.step == step
        await mgr.wait()
        assert mgr.steps() == [30, 40]
        assert step_dirs(tmp_path) == ["step_000000030", "step_000000040"]
        assert all(s.committed and s.nbytes and s.persist_s is not None for s in mgr.history)
        latest = await mgr.restore()
        assert latest["extra"] == {"step": 40}
        assert torch.equal(latest["w"], torch.full((1000,), 40.0))
        older = await mgr.restore(30)
        assert older["extra"] == {"step": 30}
        with pytest.raises(CheckpointManagerError):
            await mgr.restore(10)
    # Each step holds exactly one rank file and the manifest.
    for name in step_dirs(tmp_path):
        files = sorted(os.listdir(tmp_path / name))
        assert len(files) == 2 and files[0] == "manifest.json" and files[1].startswith("rank_")
    with pytest.raises(CheckpointManagerError):
        await mgr.save(50, state(50))  # closed


async def test_restore_into_existing_tensors(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, keep_last=2) as mgr:
        await mgr.save(7, state(7))
        await mgr.wait()
        w = torch.zeros(1000)
        ptr = w.data_ptr()
        got = await mgr.restore(into={"w": w})
    assert got["w"] is w and w.data_ptr() == ptr
    assert torch.equal(w, torch.full((1000,), 7.0)) and got["extra"] == {"step": 7}


async def test_commit_order_visible_only_after_durable(tmp_path: Path) -> None:
    stager = GatedStager()
    async with CheckpointManager(tmp_path, keep_last=2, stager=stager) as mgr:
        stager.gate.set()
        await mgr.save(1, state(1))
        await mgr.save(2, state(2))
        await mgr.wait()
        assert mgr.steps() == [1, 2]

        stager.gate.clear()
        stager.blocked.clear()
        await mgr.save(3, state(3))
        await stager.blocked.wait()
        # Step 3 is being written: its temp file exists, it is not listed,
        # and no old step has been rotated away yet.
        sdir = tmp_path / "step_000000003"
        assert any(".aiostage-tmp." in n for n in os.listdir(sdir))
        assert mgr.steps() == [1, 2]
        other = CheckpointManager(tmp_path)  # a reader elsewhere sees step 2 as latest
        assert (await other.restore())["extra"] == {"step": 2}
        await other.close()
        restoring = asyncio.create_task(mgr.restore())  # ours waits for the save
        stager.gate.set()
        assert (await restoring)["extra"] == {"step": 3}
        await mgr.wait()
        assert mgr.steps() == [2, 3]
        assert "manifest.json" in os.listdir(sdir)


async def test_save_waits_for_previous_persist(tmp_path: Path) -> None:
    stager = GatedStager()
    async with CheckpointManager(tmp_path, stager=stager) as mgr:
        await mgr.save(1, state(1))
        await stager.blocked.wait()
        second = asyncio.create_task(mgr.save(2, state(2)))
        await asyncio.wait([second], timeout=0.2)
        assert not second.done()  # at most one persist in flight
        assert len(stager.paths) == 1
        stager.gate.set()
        await second
        await mgr.wait()
        assert mgr.steps() == [1, 2]


async def test_exception_mid_persist_keeps_previous(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    calls: list[tuple[int, int]] = []

    def explode(done: int, total: int) -> None:
        calls.append((done, total))
        if done < total:
            raise Boom("disk on fire")

    async with CheckpointManager(tmp_path, keep_last=3) as mgr:
        await mgr.save(1, state(1, numel=100_000))
        await mgr.wait()
        await mgr.save(2, state(2, numel=100_000), progress=explode)
        with pytest.raises(Boom):
            await mgr.wait()
        assert calls and calls[0][0] < calls[0][1]
        await mgr.wait()  # reported once
        assert mgr.steps() == [1]
        assert (await mgr.restore())["extra"] == {"step": 1}
        leftover = tmp_path / "step_000000002"
        assert leftover.is_dir()  # the interrupted save's directory, ignored
        assert not any(".aiostage-tmp." in n for n in os.listdir(leftover))

        await mgr.save(3, state(3))
        await mgr.wait()
        assert mgr.steps() == [1, 3]
        assert not leftover.exists()  # removed by the next save


@pytest.mark.parametrize("surfaced_by", ["save", "wait", "close"])
async def test_background_error_surfaces_at_next_call(tmp_path: Path, surfaced_by: str) -> None:
    mgr = CheckpointManager(tmp_path)
    await mgr.save(1, state(1))
    await mgr.wait()
    # The commit record's path collides with a non-empty directory: the rank
    # file is written fine, the manifest rename fails in the background.
    blocker = tmp_path / "step_000000002" / "manifest.json"
    blocker.mkdir(parents=True)
    (blocker / "occupied").write_bytes(b"x")
    stats = await mgr.save(2, state(2))  # returns once staged
    with pytest.raises(PersistError) as info:
        if surfaced_by == "save":
            await mgr.save(3, state(3))
        elif surfaced_by == "wait":
            await mgr.wait()
        else:
            await mgr.close()
    assert info.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert "step 2" in str(info.value)
    assert not stats.committed
    assert mgr.steps() == [1]
    await mgr.close()  # the error was reported once
    assert not (tmp_path / "step_000000003").exists()  # the failing save(3) started nothing


async def test_step_directory_colliding_with_a_file(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as mgr:
        (tmp_path / "step_000000005").write_bytes(b"not a directory")
        with pytest.raises(PersistError) as info:
            await mgr.save(5, state(5))
        assert info.value.errno == errno.EEXIST
        await mgr.save(6, state(6))
    assert mgr.steps() == [6]


async def test_cancellation_leaving_async_with_cancels_the_save(tmp_path: Path) -> None:
    stager = GatedStager()
    mgr = CheckpointManager(tmp_path, stager=stager)
    stager.gate.set()
    async with mgr:
        await mgr.save(1, state(1))
        await mgr.wait()
    assert mgr.steps() == [1]

    stager = GatedStager()
    mgr = CheckpointManager(tmp_path, stager=stager)
    with anyio.CancelScope() as scope:
        async with mgr:
            await mgr.save(2, state(2))
            await stager.blocked.wait()
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    sdir = tmp_path / "step_000000002"
    assert os.listdir(sdir) == []  # temp file removed, no manifest
    assert mgr.steps() == [1]
    with pytest.raises(CheckpointManagerError):
        await mgr.save(3, state(3))  # closed


async def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path) as mgr:
        await mgr.save(7, state(1))
        await mgr.wait()
        first = mf.read_manifest(tmp_path / "step_000000007", 7)
        await mgr.save(7, state(2))
        await mgr.wait()
        second = mf.read_manifest(tmp_path / "step_000000007", 7)
        assert first is not None and second is not None
        assert first.attempt != second.attempt
        assert sorted(os.listdir(tmp_path / "step_000000007")) == sorted(
            [*second.files, "manifest.json"]
        )
        assert torch.equal((await mgr.restore())["w"], state(2)["w"])


async def test_steps_ignores_incomplete_and_bad_manifests(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, keep_last=10) as mgr:
        for step in (1, 2, 3, 4):
            await mgr.save(step, state(step))
        await mgr.wait()
    assert mgr.steps() == [1, 2, 3, 4]
    d2, d3, d4 = (tmp_path / f"step_00000000{i}" for i in (2, 3, 4))
    (d2 / "manifest.json").write_text((d2 / "manifest.json").read_text()[:20])  # truncated
    body = json.loads((d3 / "manifest.json").read_text())
    body["step"] = 99
    (d3 / "manifest.json").write_text(json.dumps(body))  # names another step
    rank_file = next(p for p in d4.iterdir() if p.name.startswith("rank_"))
    rank_file.unlink()  # a listed file is missing
    (tmp_path / "step_000000009").mkdir()  # no manifest at all
    (tmp_path / "notes.txt").write_text("not a step")
    mgr = CheckpointManager(tmp_path, keep_last=10)
    assert mgr.steps() == [1]
    assert (await mgr.restore())["extra"] == {"step": 1}
    await mgr.save(5, state(5))
    await mgr.close()
    assert mgr.steps() == [1, 5]
    # The save without a manifest is removed; steps holding a manifest, even
    # an invalid one, are only ever deleted by rotation.
    assert step_dirs(tmp_path) == [f"step_00000000{i}" for i in (1, 2, 3, 4, 5)]
    assert (tmp_path / "notes.txt").exists()


async def test_one_writer_per_directory(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path)
    await first.save(1, state(1))
    reader = CheckpointManager(tmp_path)
    await first.wait()
    assert reader.steps() == [1]
    assert (await reader.restore())["extra"] == {"step": 1}  # reading needs no lock
    with pytest.raises(CheckpointManagerError, match="another CheckpointManager"):
        await reader.save(2, state(2))
    await first.close()
    await reader.save(2, state(2))
    await reader.close()
    assert reader.steps() == [1, 2]


_FSIZE_CHILD = textwrap.dedent(
    """
    import asyncio, json, resource, signal, sys
    import torch
    import aiostage

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    async def main():
        out = {}
        mgr = aiostage.CheckpointManager(sys.argv[1])
        await mgr.save(1, {"w": torch.zeros(1000)})
        await mgr.wait()
        await mgr.save(2, {"w": torch.zeros(1 << 20)})  # 4 MiB: over the limit
        out["returned"] = True
        try:
            await mgr.save(3, {"w": torch.zeros(10)})
        except aiostage.PersistError as exc:
            out["errno"] = exc.errno
        out["steps"] = mgr.steps()
        await mgr.close()
        print(json.dumps(out))

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_background_write_failure_efbig(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    proc = await anyio.run_process(
        [sys.executable, "-c", _FSIZE_CHILD, str(tmp_path)], env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert out == {"returned": True, "errno": errno.EFBIG, "steps": [1]}
    assert not (tmp_path / "step_000000003").exists()  # the failing save started nothing
    assert not any(".aiostage-tmp." in n for n in os.listdir(tmp_path / "step_000000002"))


_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    import torch
    import aiostage
    from aiostage._train import _manifest

    directory, where = sys.argv[1], sys.argv[2]

    def hang(msg):
        # Tell the parent where we are, then block the event loop until killed.
        os.write(1, msg.encode() + b"\\n")
        os.read(0, 1)

    def progress(done, total):
        if where == "mid-persist" and done < total:
            hang("MID")

    if where == "before-manifest":
        real = _manifest.write_manifest
        def write_manifest(sdir, manifest):
            if manifest.step == 2:
                hang("COMMIT")
            real(sdir, manifest)
        _manifest.write_manifest = write_manifest

    async def main():
        # keep_last=1: step 1 may go only once step 2 is committed.
        mgr = aiostage.CheckpointManager(directory, keep_last=1)
        await mgr.save(1, {"w": torch.full((4_000_000,), 1.0), "step": 1})
        await mgr.wait()
        await mgr.save(2, {"w": torch.full((4_000_000,), 2.0), "step": 2}, progress=progress)
        await mgr.wait()
        os.write(1, b"FINISHED\\n")

    asyncio.run(main())
    """
)


def kill_child_at(directory: Path, where: str) -> int:
    """Run the saver child until it reports ``where``, SIGKILL it; return its status."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(directory), where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() in (b"MID", b"COMMIT"), line
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-persist", "before-manifest"])
async def test_sigkilled_saver_leaves_only_complete_steps(tmp_path: Path, where: str) -> None:
    returncode = await anyio.to_thread.run_sync(kill_child_at, tmp_path, where)
    assert returncode == -signal.SIGKILL

    sdir = tmp_path / "step_000000002"
    leftovers = os.listdir(sdir)
    assert leftovers  # the killed save left something behind
    if where == "before-manifest":
        # The rank file was durable; only the commit record is missing.
        assert any(n.startswith("rank_") and n.endswith(".pt") for n in leftovers)
    assert "manifest.json" not in leftovers

    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.steps() == [1]
    restored = await mgr.restore()
    assert restored["step"] == 1 and torch.equal(restored["w"][:3], torch.ones(3))
    await mgr.save(3, {"w": torch.zeros(10), "step": 3})
    await mgr.close()
    assert mgr.steps() == [1, 3]
    assert step_dirs(tmp_path) == ["step_000000001", "step_000000003"]


TRANSIENT = (errno.EMFILE, errno.EIO, errno.ESTALE, errno.EACCES)


@pytest.mark.parametrize("where", ["manifest", "rank_file"])
@pytest.mark.parametrize("code", TRANSIENT, ids=[errno.errorcode[c] for c in TRANSIENT])
async def test_transient_read_errors_never_delete_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, code: int
) -> None:
    """An I/O error while reading manifests means "unknown", never "incomplete"."""
    async with CheckpointManager(tmp_path, keep_last=3) as mgr:
        for step in (0, 1, 2):
            await mgr.save(step, state(step))
        await mgr.wait()
        assert mgr.steps() == [0, 1, 2]
        (tmp_path / "step_000000007").mkdir()  # an interrupted save: no manifest
        (tmp_path / "step_000000007" / "rank_00000.dead.pt").write_bytes(b"x")

        real_read_bytes, real_stat = Path.read_bytes, os.stat

        def read_bytes(self: Path) -> bytes:
            if self.name == "manifest.json":
                raise OSError(code, os.strerror(code), str(self))
            return real_read_bytes(self)

        def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            p = Path(os.fspath(path))
            if p.name.startswith("rank_") and p.parent.name != "step_000000003":
                raise OSError(code, os.strerror(code), str(p))
            return real_stat(path, *args, **kwargs)

        real_open = aiofiles.open

        def aio_open(path: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(os.fspath(path)).name == "manifest.json":
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, *args, **kwargs)

        if where == "manifest":
            monkeypatch.setattr(Path, "read_bytes", read_bytes)
            monkeypatch.setattr(aiofiles, "open", aio_open)
        else:
            monkeypatch.setattr(os, "stat", stat)
        # Rank 0 scans the directory while committing step 3: every manifest
        # (in the "manifest" case also step 3's own) reads as an error.
        await mgr.save(3, state(3))
        await mgr.wait()
        # Nothing whose state is unknown was deleted, step 3 included.  (With
        # the manifest read failing, even the save without a manifest is
        # unknown: opening fails before the lookup, as a real EMFILE does.)
        kept = (0, 1, 2, 3, 7) if where == "manifest" else (0, 1, 2, 3)
        assert step_dirs(tmp_path) == [f"step_00000000{i}" for i in kept]
        assert mgr.steps() == ([] if where == "manifest" else [3])  # unknown: not listed
        with pytest.raises(CheckpointManagerError, match="cannot tell which checkpoint"):
            await mgr.restore()  # the latest is unknown: none is picked
        if where == "manifest":
            with pytest.raises(CheckpointManagerError, match="cannot read the manifest"):
                await mgr.restore(2)
        monkeypatch.undo()

        assert mgr.steps() == [0, 1, 2, 3]  # nothing was lost
        assert (await mgr.restore())["extra"] == {"step": 3}
        await mgr.save(4, state(4))  # the fault is gone: rotation resumes
        await mgr.wait()
        assert mgr.steps() == [2, 3, 4]
        assert step_dirs(tmp_path) == ["step_000000002", "step_000000003", "step_000000004"]


async def test_resaving_an_older_step_makes_it_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run rolled back to an older step: order by commit, not by step number."""
    async with CheckpointManager(tmp_path, keep_last=2) as mgr:
        for step in (10, 20, 30):
            await mgr.save(step, state(step))
        await mgr.wait()
        assert mgr.steps() == [20, 30]
        await mgr.save(15, state(15))  # rolled back to 15 (say), training again
        await mgr.wait()
        assert mgr.steps() == [30, 15]
        assert await mgr.complete_steps() == [30, 15]
        assert step_dirs(tmp_path) == ["step_000000015", "step_000000030"]
        assert (await mgr.restore())["extra"] == {"step": 15}
        assert (await mgr.restore(30))["extra"] == {"step": 30}

    # A new process, with a wall clock that went backwards: the order comes
    # from the manifests on disk.
    monkeypatch.setattr(time, "time_ns", lambda: 1)
    async with CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert (await mgr.restore())["extra"] == {"step": 15}
        await mgr.save(12, state(12))
        await mgr.wait()
        assert mgr.steps() == [12]
        assert step_dirs(tmp_path) == ["step_000000012"]
        assert (await mgr.restore())["extra"] == {"step": 12}


async def test_close_cancelled_while_waiting_for_the_lock_stops_the_save(tmp_path: Path) -> None:
    stager = GatedStager()
    mgr = CheckpointManager(tmp_path, stager=stager)
    stager.gate.set()
    await mgr.save(1, state(1))
    await mgr.wait()
    stager.gate.clear()
    stager.blocked.clear()
    await mgr.save(2, state(2))
    await stager.blocked.wait()  # step 2 is persisting, held at the gate
    waiting = asyncio.create_task(mgr.wait())  # holds the manager's lock
    await asyncio.sleep(0)
    closing = asyncio.create_task(mgr.close())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not closing.done()  # blocked on the lock held by wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # The save in flight was cancelled and waited for before close returned:
    # once the directory lock is released nothing commits or rotates.
    stager.gate.set()
    await waiting
    assert mgr.steps() == [1]
    sdir = tmp_path / "step_000000002"
    assert not (sdir / "manifest.json").exists()
    assert not any(".aiostage-tmp." in n for n in os.listdir(sdir))
    with pytest.raises(CheckpointManagerError):
        await mgr.save(3, state(3))  # closed


async def test_history_is_bounded(tmp_path: Path) -> None:
    async with CheckpointManager(tmp_path, keep_last=1, history_len=2) as mgr:
        for step in range(5):
            await mgr.save(step, state(step, numel=10))
        await mgr.wait()
        assert [s.step for s in mgr.history] == [3, 4]
        assert all(s.committed for s in mgr.history)
    with pytest.raises(ValueError, match="history_len"):
        CheckpointManager(tmp_path, history_len=0)
