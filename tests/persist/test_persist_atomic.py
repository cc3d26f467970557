"""Atomicity and durability under real faults: cancellation, EFBIG, SIGKILL, bad paths."""

from __future__ import annotations

import asyncio
import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import pytest
import torch

import aiostage
from aiostage import PersistError
from aiostage._persist import _atomic
from aiostage._persist._writer import persist

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.aiostage-tmp.*"))


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def big_state(mib: int, parts: int = 4) -> dict[str, torch.Tensor]:
    per = mib * MiB // 4 // parts
    return {f"w{i}": torch.full((per,), float(i)) for i in range(parts)}


async def write_previous(target: Path) -> dict[str, torch.Tensor]:
    previous = {"step": torch.tensor(7), "w": torch.randn(1000)}
    await aiostage.persist(previous, target)
    return previous


async def assert_previous(target: Path, previous: dict[str, torch.Tensor]) -> None:
    loaded = await aiostage.load(target, verify=True)
    assert loaded.keys() == previous.keys()
    for k in previous:
        assert torch.equal(loaded[k], previous[k])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


async def test_cancel_mid_persist_keeps_previous_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    previous = await write_previous(target)
    first_chunk = anyio.Event()
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # call 1: the pickle; call 2: the first storage chunk
            first_chunk.set()

    task = asyncio.create_task(
        persist(big_state(128), target, progress=progress, _chunk_bytes=4 * MiB)
    )
    await first_chunk.wait()
    assert len(temps(tmp_path)) == 1  # the write really was under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert temps(tmp_path) == []
    await assert_previous(target, previous)


async def test_wait_ready_error_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    previous = await write_previous(target)

    class Boom(Exception):
        pass

    async def wait_ready(storage: torch.UntypedStorage) -> None:
        assert len(temps(tmp_path)) == 1
        raise Boom

    with pytest.raises(Boom):
        await persist({"a": torch.ones(4)}, target, wait_ready=wait_ready)
    assert temps(tmp_path) == []
    await assert_previous(target, previous)


EFBIG_CHILD = textwrap.dedent(
    """
    import asyncio, resource, signal, sys
    import torch
    from aiostage import PersistError, persist

    target, limit = sys.argv[1], int(sys.argv[2])
    state = {"w": torch.ones(limit // 2)}  # 2 * limit bytes
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        asyncio.run(persist(state, target))
    except PersistError as exc:
        print("ERRNO", exc.errno)
        print("PATH", exc.path)
        print("MESSAGE", exc)
        print("CAUSE", type(exc.__cause__).__name__)
        sys.exit(0)
    print("NO ERROR")
    sys.exit(1)
    """
)


@pytest.mark.slow
async def test_file_size_limit_gives_efbig_and_keeps_previous(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    previous = await write_previous(target)
    proc = await anyio.run_process(
        [sys.executable, "-c", EFBIG_CHILD, str(target), str(4 * MiB)],
        env=child_env(),
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert f"ERRNO {errno.EFBIG}" in out
    assert f"PATH {target}" in out
    assert "EFBIG" in out and "writing the checkpoint failed" in out
    assert "CAUSE OSError" in out
    assert temps(tmp_path) == []
    await assert_previous(target, previous)


async def test_target_is_a_directory(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(PersistError) as info:
        await aiostage.persist({"a": torch.ones(2)}, target)
    assert info.value.errno == errno.EISDIR
    assert "EISDIR" in str(info.value) and str(target) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert (target / "keep").read_text() == "x"
    assert temps(tmp_path) == []


async def test_missing_parent_directory(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "ckpt.pt"
    with pytest.raises(PersistError) as info:
        await aiostage.persist({"a": torch.ones(2)}, target)
    assert info.value.errno == errno.ENOENT
    assert "ENOENT" in str(info.value) and str(target) in str(info.value)
    assert not target.parent.exists()


async def test_read_only_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    target = tmp_path / "ro" / "ckpt.pt"
    target.parent.mkdir()
    previous = await write_previous(target)
    target.parent.chmod(0o500)
    try:
        with pytest.raises(PersistError) as info:
            await aiostage.persist({"a": torch.ones(2)}, target)
        assert info.value.errno == errno.EACCES
    finally:
        target.parent.chmod(0o700)
    await assert_previous(target, previous)


async def test_unpicklable_state_is_a_persist_error(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    previous = await write_previous(target)
    with pytest.raises(PersistError) as info:
        await aiostage.persist({"f": lambda: 1, "t": torch.ones(1)}, target)
    assert "pickling" in str(info.value) and info.value.errno is None
    assert temps(tmp_path) == []
    await assert_previous(target, previous)


async def test_views_with_different_dtypes_are_refused(tmp_path: Path) -> None:
    base = torch.zeros(8)
    with pytest.raises(PersistError, match="different dtypes") as info:
        await aiostage.persist({"f": base, "i": base.view(torch.int32)}, tmp_path / "c.pt")
    assert info.value.key == "i"  # the second view
    assert listing(tmp_path) == []


class _Scheduler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rate = 0.1


@pytest.mark.parametrize(
    ("state", "key"),
    [
        ({"opt": {"groups": [{"lr": 0.1}, {"lr": 0.2, "hook": lambda: 1}]}}, "opt.groups.1.hook"),
        ({"t": torch.ones(2), "sched": _Scheduler()}, "sched.lock"),  # an attribute
        ({"steps": (1, 2, threading.Lock())}, "steps.2"),
        ({3: {"x": threading.Lock()}}, "3.x"),  # a key that is not a string
        (threading.Lock(), "<root>"),
    ],
)
async def test_an_unpicklable_value_is_named_by_its_key_path(
    tmp_path: Path, state: object, key: str
) -> None:
    with pytest.raises(PersistError) as info:
        await aiostage.persist(state, tmp_path / "c.pt")
    assert info.value.key == key
    assert f"(at {key!r})" in str(info.value)
    assert isinstance(info.value.__cause__, (TypeError, AttributeError, pickle.PicklingError))
    assert listing(tmp_path) == []


async def test_a_failure_laying_out_the_archive_is_a_persist_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiostage._persist import _archive

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("cannot pad")

    monkeypatch.setattr(_archive, "plan_archive", broken)
    with pytest.raises(PersistError, match="cannot pad") as info:
        await aiostage.persist({"w": torch.ones(2)}, tmp_path / "c.pt")
    assert info.value.key is None and isinstance(info.value.__cause__, ValueError)
    assert listing(tmp_path) == []


def test_locating_a_failure_reads_no_tensor_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search pickles storages as persistent ids, like the write."""
    from aiostage._persist import _archive

    def no_bytes(*args: object) -> None:
        raise AssertionError("a storage's bytes were pickled")

    monkeypatch.setattr(torch.UntypedStorage, "__reduce__", no_bytes)
    state = {"w": torch.ones(4), "deep": {"ok": [torch.zeros(2)], "bad": threading.Lock()}}
    assert _archive.locate_failure(state) == "deep.bad"
    assert _archive.locate_failure({"w": torch.ones(4)}) is None


async def test_symlinked_temp_name_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "ckpt.pt"
    tokens = iter(["00000000000000aa", "00000000000000bb"])
    monkeypatch.setattr(_atomic.secrets, "token_hex", lambda n: next(tokens))
    planted = tmp_path / f".ckpt.pt.aiostage-tmp.{os.getpid()}.00000000000000aa"
    os.symlink(victim, planted)
    # The planted name is taken: creation must not follow it (O_EXCL|O_NOFOLLOW)
    # but pick another name.
    tmp, fd = _atomic.create_temp(target)
    try:
        assert tmp.name.endswith(".00000000000000bb")
        os.write(fd, b"new bytes")
    finally:
        _atomic.discard(fd, tmp)
    assert victim.read_text() == "precious"
    assert planted.is_symlink()


async def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        target = await aiostage.persist({"a": torch.ones(2)}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o640


KILL_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import torch
    from aiostage._persist._writer import persist

    target = sys.argv[1]
    state = {f"w{i}": torch.full((8 * 1024 * 1024,), float(i)) for i in range(4)}
    calls = 0

    def progress(done, total):
        global calls
        calls += 1
        if calls == 2:  # the first storage chunk is on disk
            print("ready", flush=True)
            sys.stdin.readline()  # block here until killed

    asyncio.run(persist(state, target, progress=progress, _chunk_bytes=4 * 1024 * 1024))
    print("finished", flush=True)
    """
)


@pytest.mark.slow
async def test_sigkill_mid_persist_leaves_previous_and_next_persist_cleans(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    previous = await write_previous(target)
    async with await anyio.open_process(
        [sys.executable, "-c", KILL_CHILD, str(target)], env=child_env()
    ) as proc:
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive()
        assert line == b"ready\n"
        stale = temps(tmp_path)
        assert len(stale) == 1 and f".{proc.pid}." in stale[0].name
        assert os.stat(stale[0]).st_size > 4 * MiB
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert temps(tmp_path) == stale  # the killed writer left its temp file
    await assert_previous(target, previous)

    await aiostage.persist({"new": torch.ones(3)}, target)
    assert temps(tmp_path) == []
    assert torch.equal((await aiostage.load(target))["new"], torch.ones(3))


async def test_stale_cleanup_spares_live_writers_and_other_targets(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    # The pid of a process that has exited (and been reaped) is dead.
    dead = _dead_pid()
    live = os.getppid()
    token = "0123456789abcdef"
    dead_same = tmp_path / f".ckpt.pt.aiostage-tmp.{dead}.{token}"
    live_same = tmp_path / f".ckpt.pt.aiostage-tmp.{live}.{token}"
    dead_other = tmp_path / f".other.pt.aiostage-tmp.{dead}.{token}"
    unrelated = tmp_path / f".ckpt.pt.aiostage-tmp.{dead}.not-a-token"
    for p in (dead_same, live_same, dead_other, unrelated):
        p.write_bytes(b"partial")
    # A concurrent writer of this very process, for the same target, is spared.
    mine, fd = _atomic.create_temp(target)
    try:
        removed = _atomic.remove_stale_temps(target)
    finally:
        _atomic.discard(fd, mine)
    assert removed == [dead_same]
    assert not dead_same.exists()
    assert live_same.exists() and dead_other.exists() and unrelated.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_abandoned_temp_of_this_process_is_stale(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    tmp, fd = _atomic.create_temp(target)
    os.close(fd)
    _atomic.forget_temp(tmp)  # as if its writer vanished without cleanup
    await aiostage.persist({"a": torch.ones(2)}, target)
    assert not tmp.exists()


def test_only_a_large_regular_file_of_its_own_is_held_across_the_rename(tmp_path: Path) -> None:
    """hold_replaced opens the old checkpoint only when that defers real work:
    never a symlink (not followed), a FIFO (would block), a small file or
    one hard-linked elsewhere (renaming over it frees nothing)."""
    big = tmp_path / "big.pt"
    with open(big, "wb") as f:
        f.truncate(_atomic.HOLD_MIN_BYTES)
    fd = _atomic.hold_replaced(big)
    assert fd is not None
    try:
        assert os.fstat(fd).st_ino == big.stat().st_ino
    finally:
        os.close(fd)

    small = tmp_path / "small.pt"
    small.write_bytes(b"x" * 100)
    assert _atomic.hold_replaced(small) is None

    link = tmp_path / "link.pt"
    link.symlink_to(big)
    assert _atomic.hold_replaced(link) is None

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    assert _atomic.hold_replaced(fifo) is None  # returns at once: O_NONBLOCK

    twin = tmp_path / "twin.pt"
    os.link(big, twin)
    assert _atomic.hold_replaced(big) is None
    assert _atomic.hold_replaced(tmp_path / "missing.pt") is None


async def test_persist_over_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    await persist({"old": torch.ones(5 * MiB)}, real)
    link = tmp_path / "ckpt.pt"
    link.symlink_to(real)
    await persist({"new": torch.zeros(5 * MiB)}, link)
    assert not link.is_symlink()
    assert list((await aiostage.load(link)).keys()) == ["new"]
    assert list((await aiostage.load(real)).keys()) == ["old"]
