"""Run `haina pretrain` under torchrun (gloo) and read back its metrics, for the parallel-engine tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 240


def run_pretrain(run_dir: Path, data: Path, nproc: int, *overrides: str) -> list[dict]:
    """Train the tiny preset with ``nproc`` processes; returns metrics.jsonl's records."""
    command = [
        sys.executable, "-m", "haina.tools.cli", "pretrain", "--nproc-per-node", str(nproc), "--config", "tiny",
        f"train.run_dir={run_dir}", f"data.prefixes=[{data}]", *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_rel_diff(a: list[dict], b: list[dict], key: str) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[key] - y[key]) / max(abs(x[key]), 1e-12) for x, y in zip(a, b, strict=True))
