"""Reliability across processes (gloo, torchrun): kill -9 of a worker and SIGTERM of one rank.

Every run goes through subprocess with a timeout; faults come from ``HAINA_FAULTS`` (the process signals
itself at the end of step k), so nothing waits on the clock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from haina.core.checkpoint import latest_checkpoint
from haina.core.faults import ENV
from tests.parallel_helpers import TIMEOUT_S

pytestmark = pytest.mark.integration  # two workers under torchrun in every test

ARGS = ("optim.decay_steps=8", "train.steps=8", "train.save_every=2", "parallel.dp_shard=2")


def torchrun(run: Path, data: Path, *, restarts: int = 0, faults: str = "") -> subprocess.CompletedProcess:
    """``haina pretrain --nproc-per-node 2 ... train.max_restarts=N``: haina's own launcher starts torchrun."""
    command = [
        sys.executable, "-m", "haina.tools.cli", "pretrain", "--nproc-per-node", "2", "--config", "tiny",
        f"train.run_dir={run}", f"data.prefixes=[{data}]", *ARGS, f"train.max_restarts={restarts}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    env.pop(ENV, None)
    if faults:
        env[ENV] = faults
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


def trajectory(run: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "event" not in r]


def events(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> list:
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = torchrun(run, tiny_data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return trajectory(run)


def test_kill_9_of_each_rank_then_torchrun_restarts_are_exact(reference: list, tmp_path: Path, tiny_data: Path) -> None:
    """SIGKILL rank 0 at the end of step 3, and on the restarted attempt rank 1 at the end of step 5 (both
    between checkpoints, so work is lost); torchrun restarts both workers each time
    (train.max_restarts=2); the run resumes from the last checkpoint each time and matches exactly."""
    run = tmp_path / "run"
    proc = torchrun(run, tiny_data, restarts=2, faults="step_end:sigkill@3:0,step_end:sigkill@5:1#1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # torchrun names the first failure it observes in each attempt (one node: local rank = rank): the killed
    # rank by SIGKILL, or, when the survivor's error on the dead connection reaches it first (a loaded
    # machine), the other rank exiting 1 with that error; rank 0 goes first, then rank 1
    died = re.findall(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)", proc.stderr)
    assert len(died) == 2, proc.stderr[-3000:]
    for (code, rank), killed in zip(died, ("0", "1"), strict=True):
        assert (code, rank) in (("-9", killed), ("1", "1" if killed == "0" else "0")), proc.stderr[-3000:]
    survivor_errors = len(re.findall(r"haina pretrain: failed: RuntimeError: .*(?:closed|reset) by peer", proc.stderr))
    assert survivor_errors >= sum(code == "1" for code, _ in died), proc.stderr[-3000:]
    assert trajectory(run) == reference
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_8"


def test_sigterm_on_one_rank_saves_everywhere_and_resumes(reference: list, tmp_path: Path, tiny_data: Path) -> None:
    """SIGTERM reaches rank 1 only at step 3: both ranks checkpoint step 3 and exit 143; resume is exact."""
    run = tmp_path / "run"
    proc = torchrun(run, tiny_data, faults="step_end:sigterm@3:1")
    assert proc.returncode != 0
    assert "exiting with 143" in proc.stderr, proc.stderr[-3000:]
    # torchrun's report: the first rank out exits 143; the other either did too or, still on its way out
    # after the (collective) save, was stopped by the agent with SIGTERM (-15). Nothing else failed.
    codes = re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)
    assert "143" in codes and set(codes) <= {"143", "-15"}, proc.stderr[-3000:]
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_3"
    assert events(run) == [{"step": 3, "event": "preempted", "signal": 15, "exit_code": 143, "checkpoint": "step_3"}]
    proc = torchrun(run, tiny_data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert trajectory(run) == reference
