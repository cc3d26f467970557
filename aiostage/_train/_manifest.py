"""On-disk layout of a checkpoint directory and its commit records (blocking; worker threads).

::

    directory/
        step_000000100/
            rank_00000.<attempt>.pt      one torch.save archive per rank
            rank_00001.<attempt>.pt
            manifest.json                the commit record, written last
        step_000000200/
            ...

A step is *complete* when its ``manifest.json`` parses, names the step, and
every rank file it lists exists with the recorded size.  The manifest is
written atomically (temp file ``.manifest.json.<attempt>.tmp``, fsync,
rename, directory fsync) only after every rank's file is durable, so a crash
at any instant leaves either no manifest (the step is ignored) or a complete
step.  ``<attempt>`` is a random id chosen per save and per rank; the manifest
lists the exact file names of the attempt that committed, so files of an
earlier, interrupted attempt at the same step are never mistaken for this
one's and are removed once the step is committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import aiofiles

from aiostage._threads import run_sync

__all__ = [
    "FORMAT",
    "MANIFEST",
    "Manifest",
    "Scan",
    "fsync_dir",
    "rank_file_name",
    "check_manifest",
    "read_manifest",
    "read_manifest_async",
    "remove_step",
    "remove_unlisted",
    "scan",
    "step_dir",
    "write_manifest",
]

FORMAT = "aiostage.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"step_(\d{9,})")


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated commit record."""

    step: int
    attempt: str
    files: tuple[str, ...]
    """Rank file names, indexed by rank."""
    sizes: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.files)


def step_dir(directory: Path, step: int) -> Path:
    """The directory of ``step``'s checkpoint."""
    return directory / f"step_{step:09d}"


def rank_file_name(rank: int, attempt: str) -> str:
    return f"rank_{rank:05d}.{attempt}.pt"


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(sdir: Path, step: int) -> Manifest | None:
    """The manifest of ``sdir`` if the step is complete, else ``None``."""
    try:
        raw = (sdir / MANIFEST).read_bytes()
    except OSError:
        return None
    return check_manifest(sdir, step, raw)


async def read_manifest_async(sdir: Path, step: int) -> Manifest | None:
    """:func:`read_manifest` with the file read through aiofiles.

    Cancellation: a read-only step; the file is closed and nothing is left.
    """
    try:
        async with aiofiles.open(sdir / MANIFEST, "rb") as f:
            raw = await f.read()
    except OSError:
        return None
    return await run_sync(check_manifest, sdir, step, raw)


def check_manifest(sdir: Path, step: int, raw: bytes) -> Manifest | None:
    """Parse a manifest and check the files it lists; ``None`` if incomplete."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    try:
        if data["format"] != FORMAT or data["version"] != VERSION or data["step"] != step:
            return None
        entries = data["files"]
        files = tuple(str(e["file"]) for e in entries)
        sizes = tuple(int(e["bytes"]) for e in entries)
        if [int(e["rank"]) for e in entries] != list(range(len(entries))) or not files:
            return None
        attempt = str(data["attempt"])
    except (KeyError, TypeError, ValueError):
        return None
    for name, size in zip(files, sizes, strict=True):
        if "/" in name or name.startswith("."):
            return None
        try:
            if os.stat(sdir / name).st_size != size:
                return None
        except OSError:
            return None
    return Manifest(step, attempt, files, sizes)


def write_manifest(sdir: Path, manifest: Manifest) -> None:
    """Write ``manifest`` atomically: temp file, fsync, rename, directory fsync.

    The temp file's name carries the attempt id, so that two attempts never
    share one.  On failure the temp file is removed and the previous
    manifest, if any, is untouched.
    """
    body = {
        "format": FORMAT,
        "version": VERSION,
        "step": manifest.step,
        "attempt": manifest.attempt,
        "world_size": manifest.world_size,
        "files": [
            {"rank": rank, "file": name, "bytes": size}
            for rank, (name, size) in enumerate(zip(manifest.files, manifest.sizes, strict=True))
        ],
        "committed_at": time.time(),
    }
    data = json.dumps(body, indent=1).encode()
    tmp = sdir / f".{MANIFEST}.{manifest.attempt}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            view = memoryview(data)
            while view.nbytes:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, sdir / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(sdir)


@dataclass(frozen=True)
class Scan:
    """What a checkpoint directory holds."""

    complete: list[tuple[int, Path, Manifest]]
    """Complete steps, ascending."""
    incomplete: list[Path]
    """Step directories without a valid manifest (interrupted saves)."""


def scan(directory: Path) -> Scan:
    """List the step directories of ``directory``; other entries are ignored."""
    complete: list[tuple[int, Path, Manifest]] = []
    incomplete: list[Path] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return Scan([], [])
    for name in names:
        m = _STEP_RE.fullmatch(name)
        if m is None:
            continue
        sdir = directory / name
        if not sdir.is_dir() or sdir.is_symlink():
            continue
        step = int(m.group(1))
        manifest = read_manifest(sdir, step)
        if manifest is None:
            incomplete.append(sdir)
        else:
            complete.append((step, sdir, manifest))
    complete.sort(key=lambda item: item[0])
    return Scan(complete, incomplete)


def remove_step(sdir: Path) -> None:
    """Delete a step: its manifest first (so it stops being complete), then the rest."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sdir / MANIFEST)
        fsync_dir(sdir)
    shutil.rmtree(sdir, ignore_errors=True)


def remove_unlisted(sdir: Path, manifest: Manifest) -> list[str]:
    """Remove entries of a complete step that its manifest does not list."""
    keep = {*manifest.files, MANIFEST}
    removed: list[str] = []
    for name in os.listdir(sdir):
        if name in keep:
            continue
        path = sdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        removed.append(name)
    return removed
