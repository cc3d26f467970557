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

Each manifest carries a commit sequence number (``sequence``), strictly
larger than that of every manifest readable when it was committed and at
least the wall clock in nanoseconds: steps are ordered by commit, not by
step number, so re-saving an older step (a rolled-back run) makes it the
latest.

Reading is three-valued: a step is *complete*, *incomplete* (no manifest:
an interrupted save, safe to remove), *invalid* (a manifest that is
definitely wrong: not listed, but never removed automatically) or
*unreadable* (an I/O error other than "no such file" -- EMFILE, EIO,
ESTALE, EACCES -- while reading its manifest or checking its files: its
state is unknown, so it is neither listed nor removed).
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

from aiostage._persist._atomic import fsync_dir
from aiostage._threads import run_sync

__all__ = [
    "FORMAT",
    "MANIFEST",
    "Manifest",
    "Scan",
    "rank_file_name",
    "check_manifest",
    "read_manifest",
    "read_manifest_async",
    "remove_leftover",
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
    sequence: int = 0
    """Commit order within the directory (0 in manifests that predate it)."""
    committed_at: float = 0.0
    """Wall-clock time of the commit (informative only)."""

    @property
    def world_size(self) -> int:
        return len(self.files)

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: commit order, then step number."""
        return (self.sequence, self.step)


def step_dir(directory: Path, step: int) -> Path:
    """The directory of ``step``'s checkpoint."""
    return directory / f"step_{step:09d}"


def rank_file_name(rank: int, attempt: str) -> str:
    return f"rank_{rank:05d}.{attempt}.pt"


def read_manifest(sdir: Path, step: int) -> Manifest | None:
    """The manifest of ``sdir`` if the step is complete, else ``None``.

    ``None`` means definitely not complete: no manifest, or an invalid one.

    Raises:
        OSError: reading the manifest or checking a listed file failed with
            an error other than "no such file" (EMFILE, EIO, ESTALE, ...):
            whether the step is complete is unknown.
    """
    try:
        raw = (sdir / MANIFEST).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return check_manifest(sdir, step, raw)


async def read_manifest_async(sdir: Path, step: int) -> Manifest | None:
    """:func:`read_manifest` with the file read through aiofiles.

    Cancellation: a read-only step; the file is closed and nothing is left.
    """
    try:
        async with aiofiles.open(sdir / MANIFEST, "rb") as f:
            raw = await f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return await run_sync(check_manifest, sdir, step, raw)


def check_manifest(sdir: Path, step: int, raw: bytes) -> Manifest | None:
    """Parse a manifest and check the files it lists; ``None`` if invalid.

    Raises:
        OSError: a listed file could not be checked (an error other than
            "no such file"): the step's state is unknown.
    """
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
        sequence = int(data.get("sequence", 0))
        committed_at = float(data.get("committed_at", 0.0))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    for name, size in zip(files, sizes, strict=True):
        if "/" in name or name.startswith("."):
            return None
        try:
            if os.stat(sdir / name).st_size != size:
                return None
        except FileNotFoundError:
            return None
    return Manifest(step, attempt, files, sizes, sequence, committed_at)


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
        "sequence": manifest.sequence,
        "committed_at": manifest.committed_at or time.time(),
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
    """Complete steps in commit order, oldest first."""
    incomplete: list[Path]
    """Step directories without a manifest (interrupted saves): removable."""
    invalid: list[Path]
    """Step directories whose manifest is invalid: not complete, not removed."""
    unreadable: list[tuple[Path, OSError]]
    """Step directories whose state is unknown (I/O error): not complete, not removed."""


def scan(directory: Path) -> Scan:
    """List the step directories of ``directory``; other entries are ignored.

    Raises:
        OSError: ``directory`` cannot be listed (other than not existing).
    """
    found = Scan([], [], [], [])
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        m = _STEP_RE.fullmatch(name)
        if m is None:
            continue
        sdir = directory / name
        if not sdir.is_dir() or sdir.is_symlink():
            continue
        step = int(m.group(1))
        try:
            raw = (sdir / MANIFEST).read_bytes()
        except FileNotFoundError:
            found.incomplete.append(sdir)
            continue
        except IsADirectoryError:
            found.invalid.append(sdir)
            continue
        except OSError as exc:
            found.unreadable.append((sdir, exc))
            continue
        try:
            manifest = check_manifest(sdir, step, raw)
        except OSError as exc:
            found.unreadable.append((sdir, exc))
            continue
        if manifest is None:
            found.invalid.append(sdir)
        else:
            found.complete.append((step, sdir, manifest))
    found.complete.sort(key=lambda item: item[2].order)
    return found


def remove_step(sdir: Path) -> None:
    """Delete a step: its manifest first (so it stops being complete), then the rest.

    Raises:
        OSError: the manifest could not be removed (the step is left whole).
    """
    try:
        os.unlink(sdir / MANIFEST)
    except FileNotFoundError:
        pass
    else:
        fsync_dir(sdir)
    shutil.rmtree(sdir, ignore_errors=True)


def remove_leftover(sdir: Path) -> bool:
    """Delete an interrupted save's step directory, if it still has no manifest.

    Returns whether it was deleted.  A directory that holds a
    ``manifest.json`` (or whose manifest cannot be looked up) is left alone:
    only rotation (:func:`remove_step`) deletes committed steps.
    """
    try:
        os.lstat(sdir / MANIFEST)
    except FileNotFoundError:
        shutil.rmtree(sdir, ignore_errors=True)
        return True
    except OSError:
        return False
    return False


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
