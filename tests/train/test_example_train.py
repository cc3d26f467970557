"""examples/train.py end to end, small: it must crash, resume and PASS (and FAIL when it should)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--steps", "20", "--every", "5", "--width", "128", "--depth", "2", "--no-progress"]


def run_example(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "train.py"),
            *SMALL,
            "--dir",
            str(tmp_path),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_example_crashes_resumes_and_passes(tmp_path: Path) -> None:
    proc = run_example(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "simulated crash while persisting step 15" in out
    assert "complete checkpoints [5, 10], interrupted: ['step_000000015']" in out
    assert "resumed from step 10" in out
    assert "\nPASS: " in out and "FAIL" not in out
    assert "MB/s" in out  # the per-checkpoint figures
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000000015", "step_000000020"]


@pytest.mark.slow
def test_example_detects_a_bad_resume(tmp_path: Path) -> None:
    proc = run_example(tmp_path, "--skip-rng-restore")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "\nFAIL: " in proc.stdout and "PASS" not in proc.stdout
