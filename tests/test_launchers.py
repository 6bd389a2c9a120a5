"""The launchers of the README in their local forms: ``launchers/torchrun.sh`` on this node with two
workers, and ``launchers/slurm.sbatch`` with ``scontrol``/``srun`` stood in for by one-line scripts (what
Slurm would run on each node is exactly the script's own torchrun line)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel_helpers import TIMEOUT_S

pytestmark = pytest.mark.integration  # each test launches torchrun

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's torchrun
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "event" not in json.loads(line)]


def test_torchrun_launcher_runs_two_workers(tmp_path: Path, tiny_data: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(ROOT / "launchers" / "torchrun.sh"), "pretrain", "--config", "tiny", f"train.run_dir={run}",
         f"data.prefixes=[{tiny_data}]", "train.steps=2", "parallel.dp_shard=2"],
        env=_env(NPROC_PER_NODE="2", MASTER_PORT=str(_free_port())), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(run) == [1, 2]  # with parallel.dp_shard=2, which a world of one refuses: two workers ran


def test_slurm_script_starts_torchrun_per_node(tmp_path: Path, tiny_data: Path) -> None:
    """One node of the sbatch script: its srun line runs torchrun with the node's rank and rendezvous."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    # srun: drop its own options, run the command once (this node)
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for tool in ("scontrol", "srun"):
        (fake / tool).chmod(0o755)
    run = tmp_path / "run"
    env = _env(SLURM_JOB_NODELIST="node0", SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_ID="7",
               NPROC_PER_NODE="1", MASTER_PORT=str(_free_port()))
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", str(ROOT / "launchers" / "slurm.sbatch"), "--config", "tiny", f"train.run_dir={run}",
         f"data.prefixes=[{tiny_data}]", "train.steps=2"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(run) == [1, 2]
