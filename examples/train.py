"""Checkpoint a real training loop asynchronously, crash it, resume it, check it bit for bit.

Run::

    python examples/train.py                 # about a minute on 2 CPU cores
    python examples/train.py --steps 20 --every 5 --width 128   # a few seconds

What happens:

1. A child process trains a small MLP (AdamW, a LambdaLR schedule, dropout,
   a shuffling data loader over synthetic data) and checkpoints every
   ``--every`` steps with :class:`aiostage.CheckpointManager`.  The training
   loop only waits while the state is staged; the file is written in the
   background.  It prints, per checkpoint, how long the loop was blocked,
   the stage and persist times and the throughput.  At ``--crash-at`` it
   SIGKILLs itself in the middle of persisting a checkpoint.
2. A fresh child process resumes from the latest complete checkpoint
   (model, optimizer, scheduler, RNG states and data-loader position) and
   trains to the end.
3. This process trains the same run without interruption (and without
   checkpointing) and compares the final parameters and optimizer state of
   both runs byte for byte: PASS, or FAIL and exit status 1.

Everything goes to a temporary directory unless ``--dir`` names one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Bitwise reproducibility across processes: MKL may pick kernels by the
# memory alignment of each buffer, so the same matmul can round differently in
# a resumed process than in the original.  Conditional Numerical
# Reproducibility pins that choice; it must be set before MKL loads.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import numpy as np
import torch

import aiostage
from aiostage import CheckpointManager, SaveStats, get_state, set_state

try:
    from tqdm import tqdm  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - the bars are optional
    tqdm = None

MB = 1e6


def say(message: str = "") -> None:
    """Print a line without garbling a progress bar that is on screen."""
    if tqdm is not None:
        tqdm.write(message)
    else:
        print(message)
    sys.stdout.flush()


# -- the training run ----------------------------------------------------------


class ShuffledLoader:
    """Batches of a fixed synthetic data set, reshuffled every epoch.

    Its position (epoch, permutation, index) and its generator's state are
    what a real data loader would have to checkpoint too.
    """

    def __init__(self, n: int, features: int, batch: int, seed: int) -> None:
        data_gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, features, generator=data_gen)
        teacher = torch.randn(features, features, generator=data_gen) / math.sqrt(features)
        self.y = torch.tanh(self.x @ teacher)
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.perm = torch.empty(0, dtype=torch.int64)
        self.pos = 0
        self.epoch = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch > self.perm.numel():
            self.perm = torch.randperm(self.x.shape[0], generator=self.gen)
            self.pos = 0
            self.epoch += 1
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return {
            "gen": self.gen.get_state(),
            "perm": self.perm.clone(),
            "pos": self.pos,
            "epoch": self.epoch,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gen.set_state(sd["gen"])
        self.perm = sd["perm"].clone()
        self.pos = int(sd["pos"])
        self.epoch = int(sd["epoch"])


class Run:
    """Model, optimizer, schedule and data, built deterministically from the args."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        layers: list[torch.nn.Module] = [torch.nn.Linear(args.features, args.width)]
        for _ in range(args.depth - 1):
            layers += [
                torch.nn.GELU(),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(args.width, args.width),
            ]
        layers += [torch.nn.GELU(), torch.nn.Linear(args.width, args.features)]
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
        total = args.steps

        def schedule(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.loader = ShuffledLoader(4096, args.features, args.batch, args.seed)
        self.step = 0
        self.loss = float("nan")
        self.restore_rng = not args.skip_rng_restore

    def train_step(self) -> None:
        """One optimizer step (run on a worker thread: the event loop stays free)."""
        x, y = self.loader.next()
        # A little noise from Python's and NumPy's RNGs, so they matter too.
        jitter = 1.0 + 0.01 * (random.random() - 0.5) + 0.01 * (float(np.random.rand()) - 0.5)
        loss = torch.nn.functional.mse_loss(self.model(x * jitter), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.loss = loss.item()

    def state(self) -> dict[str, Any]:
        extra = {
            "step": self.step,
            "scheduler": self.sched.state_dict(),
            "loader": self.loader.state_dict(),
        }
        return get_state(self.model, self.opt, extra=extra)

    def load(self, state: dict[str, Any]) -> None:
        extra = set_state(self.model, self.opt, state, rng=self.restore_rng)
        self.sched.load_state_dict(extra["scheduler"])
        self.loader.load_state_dict(extra["loader"])
        self.step = int(extra["step"])


# -- progress bars ---------------------------------------------------------------


def bar(desc: str, enabled: bool) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A tqdm byte bar driven by aiostage's ``progress(done, total)`` callback."""
    if not enabled or tqdm is None:
        return None, lambda: None
    state: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        b = state.get("bar")
        if b is None:
            b = state["bar"] = tqdm(
                total=total, desc=desc, unit="B", unit_scale=True, leave=False, disable=None
            )
        b.update(done - b.n)
        if done >= total:
            close()

    def close() -> None:
        b = state.pop("bar", None)
        if b is not None:
            b.close()

    return progress, close


# -- the child roles ---------------------------------------------------------------


def checkpoint_table(history: list[SaveStats]) -> Iterator[str]:
    yield (
        "   step | loop blocked | (waiting prev | staging) | persist |  commit |"
        "    size | throughput"
    )
    for s in history:
        if not s.committed or s.persist_s is None or s.commit_s is None:
            yield f" {s.step:6d} | {s.blocked_s * 1e3:9.1f} ms | not committed"
            continue
        mbps = (s.throughput_bps or 0.0) / MB
        yield (
            f" {s.step:6d} | {s.blocked_s * 1e3:9.1f} ms | ({s.waited_s * 1e3:9.1f} ms |"
            f" {s.stage_s * 1e3:5.1f} ms) | {s.persist_s * 1e3:4.0f} ms |"
            f" {s.commit_s * 1e3:4.1f} ms | {(s.nbytes or 0) / MB:4.1f} MB | {mbps:6.0f} MB/s"
        )


async def train_with_checkpoints(args: argparse.Namespace, resume: bool) -> None:
    run = Run(args)
    ckpt_dir = Path(args.dir) / "checkpoints"
    bars = not args.no_progress
    async with CheckpointManager(ckpt_dir, keep_last=args.keep_last) as mgr:
        if resume:
            steps = mgr.steps()
            progress, close = bar("load", bars)
            t0 = time.perf_counter()
            state = await mgr.restore(verify=True, progress=progress)
            close()
            run.load(state)
            say(
                f"  resumed from step {run.step} (complete checkpoints: {steps}) in"
                f" {(time.perf_counter() - t0) * 1e3:.0f} ms (read + CRC check)",
            )
        start_step, t_start = run.step, time.perf_counter()
        loop_blocked = 0.0
        while run.step < args.steps:
            if not resume and run.step == args.crash_at and run.step % args.every != 0:
                crash(f"at step {run.step}")
            await asyncio.to_thread(run.train_step)
            if run.step % args.every == 0:
                crash_now = not resume and run.step == args.crash_at
                progress, close = bar(f"save step {run.step}", bars and not crash_now)
                if crash_now:
                    progress = crash_mid_persist(run.step, mgr.history)
                stats = await mgr.save(run.step, run.state(), progress=progress)
                loop_blocked += stats.blocked_s
                say(
                    f"  step {run.step:5d}  loss {run.loss:.5f}  checkpoint staged, loop blocked"
                    f" {stats.blocked_s * 1e3:.1f} ms",
                )
        await mgr.wait()
        elapsed = time.perf_counter() - t_start
        for line in checkpoint_table(mgr.history):
            say(line)
        n = run.step - start_step
        say(
            f"  {n} steps in {elapsed:.2f} s ({n / elapsed:.1f} steps/s); the loop was blocked"
            f" by checkpointing for {loop_blocked * 1e3:.0f} ms"
            f" ({100 * loop_blocked / elapsed:.1f}%)",
        )
    final = run.state()
    await aiostage.persist({"model": final["model"], "optim": final["optim"]}, args.final)


def crash(where: str) -> None:
    say(f"  *** simulated crash {where}: SIGKILL ***")
    os.kill(os.getpid(), signal.SIGKILL)


def crash_mid_persist(step: int, history: list[SaveStats]) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        if done < total:
            # This save waited for the previous ones: they are all committed.
            for line in checkpoint_table([s for s in history if s.step != step]):
                say(line)
            crash(f"while persisting step {step} ({done}/{total} bytes written)")

    return progress


# -- the parent ------------------------------------------------------------------


def child(args: argparse.Namespace, role: str) -> int:
    argv = [sys.executable, os.path.abspath(__file__), "--role", role, *args.forward]
    return subprocess.run(argv, check=False).returncode


def compare(a: Any, b: Any, path: str = "") -> tuple[int, int, list[str]]:
    """Compare two states leaf by leaf, tensors byte for byte."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return 0, 0, [f"{path}: keys differ"]
        out: tuple[int, int, list[str]] = (0, 0, [])
        for k in sorted(a, key=str):
            n, nbytes, bad = compare(a[k], b[k], f"{path}.{k}" if path else str(k))
            out = (out[0] + n, out[1] + nbytes, out[2] + bad)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        acc: tuple[int, int, list[str]] = (0, 0, [])
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            n, nbytes, bad = compare(x, y, f"{path}.{i}")
            acc = (acc[0] + n, acc[1] + nbytes, acc[2] + bad)
        return acc
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(
                a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
            )
        )
        if same:
            return 1, a.numel() * a.element_size(), []
        diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else math.nan
        return 1, 0, [f"{path}: differs (max abs diff {diff:.3g})"]
    return 0, 0, [] if a == b else [f"{path}: {a!r} != {b!r}"]


async def reference_run(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    t0 = time.perf_counter()
    while run.step < args.steps:
        await asyncio.to_thread(run.train_step)
    elapsed = time.perf_counter() - t0
    say(f"  {args.steps} steps in {elapsed:.2f} s, final loss {run.loss:.5f}")
    state = run.state()
    return {"model": state["model"], "optim": state["optim"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--crash-at", type=int, default=None, help="step to crash at (default ~2/3)")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--width", type=int, default=1024, help="hidden width (default 1024)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument(
        "--skip-rng-restore",
        action="store_true",
        help="resume without restoring the RNG states (to see the check FAIL)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show aiostage's INFO logs")
    p.add_argument("--role", choices=["crash", "resume"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--final", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.crash_at is None:
        args.crash_at = args.every * max(2, round(args.steps * 2 / 3 / args.every))
    if not 2 * args.every <= args.crash_at < args.steps:
        p.error("need 2 * --every <= --crash-at < --steps (one checkpoint before the crash)")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="  [%(name)s] %(message)s",
    )
    torch.set_num_threads(args.threads)

    if args.role is not None:  # a child process
        asyncio.run(train_with_checkpoints(args, resume=args.role == "resume"))
        return 0

    with contextlib.ExitStack() as stack:
        if args.dir is None:
            args.dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="aiostage-train-"))
        work = Path(args.dir)
        work.mkdir(parents=True, exist_ok=True)
        args.final = str(work / "final_resumed.pt")
        args.forward = [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k
            in {
                "steps",
                "every",
                "crash_at",
                "keep_last",
                "width",
                "depth",
                "features",
                "batch",
                "seed",
                "threads",
                "dir",
                "final",
            }
        ]
        for flag in ("no_progress", "verbose", "skip_rng_restore"):
            if getattr(args, flag):
                args.forward.append(f"--{flag.replace('_', '-')}")
        n_params = sum(p.numel() for p in Run(args).model.parameters())
        say(
            f"aiostage {aiostage.__version__}, torch {torch.__version__}, {args.threads} threads;"
            f" model {n_params / 1e6:.2f} M parameters; work dir {work}"
        )

        say(
            f"\n[1/3] training with a checkpoint every {args.every} steps, crashing at step"
            f" {args.crash_at}",
        )
        code = child(args, "crash")
        if code != -signal.SIGKILL:
            say(f"FAIL: the crashing run exited with {code}, not SIGKILL")
            return 1
        ckpts = work / "checkpoints"
        mgr = CheckpointManager(ckpts)
        leftovers = sorted(
            d.name
            for d in ckpts.iterdir()
            if d.name.startswith("step_") and int(d.name[5:]) not in mgr.steps()
        )
        say(f"  after the crash: complete checkpoints {mgr.steps()}, interrupted: {leftovers}")

        say("\n[2/3] a fresh process resumes from the latest checkpoint")
        code = child(args, "resume")
        if code != 0:
            say(f"FAIL: the resumed run exited with {code}")
            return 1
        say(f"  checkpoints now: {CheckpointManager(ckpts).steps()}")

        say("\n[3/3] the same run without interruption, for comparison")
        expected = asyncio.run(reference_run(args))
        resumed = asyncio.run(aiostage.load(args.final))
        n, nbytes, bad = compare(resumed, expected)
        if bad or n == 0:
            say(
                f"\nFAIL: the resumed run differs from the uninterrupted one in {len(bad)}"
                " tensors or values:"
            )
            for line in bad[:20]:
                say(f"  {line}")
            return 1
        say(
            f"\nPASS: parameters and optimizer state after resuming are bitwise identical to"
            f" the uninterrupted run ({n} tensors, {nbytes / MB:.1f} MB compared)"
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
