"""Run `haina pretrain` under torchrun (gloo) and read back its metrics, for the parallel-engine tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


def run_pretrains(runs: list[tuple[str, Path, list[str]]], data: Path, nproc: int) -> dict[str, list[dict]]:
    """Train the tiny preset once for each ``(name, run_dir, overrides)``, in order, all in one launch of
    ``nproc`` processes (:mod:`tests.multi_train`); each run's metrics.jsonl records by name."""
    return run_many([{"name": name, "overrides": [f"train.run_dir={run_dir}", f"data.prefixes=[{data}]", *overrides]}
                     for name, run_dir, overrides in runs], nproc)


def run_many(spec: list[dict], nproc: int) -> dict[str, list[dict]]:
    """The runs of a :mod:`tests.multi_train` spec (each with ``train.run_dir=`` among its overrides), in
    one launch of ``nproc`` processes; each run's metrics.jsonl records by name."""
    run_dirs = {run["name"]: Path(next(o for o in run["overrides"] if o.startswith("train.run_dir="))
                                  .split("=", 1)[1]) for run in spec}
    first = next(iter(run_dirs.values()))
    spec_file = first.parent / f".spec-{spec[0]['name']}.json".replace(" ", "_")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *launch, "-m", "tests.multi_train", str(spec_file)], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT_S * len(spec))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            for name, run_dir in run_dirs.items()}


def max_rel_diff(a: list[dict], b: list[dict], key: str) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[key] - y[key]) / max(abs(x[key]), 1e-12) for x, y in zip(a, b, strict=True))


@contextmanager
def gloo_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """The body of an ``mp.spawn`` test worker, run as one rank of a gloo group on this host (one compute
    thread). A worker whose body passed ends through :func:`haina.core.distributed.end_worker`, which leaves
    the group; a failing body leaves the group and raises, so spawn reports its traceback."""
    import torch
    import torch.distributed as dist

    from haina.core.distributed import end_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    end_worker(0)
