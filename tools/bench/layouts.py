"""CPU (gloo) step time of the tiny preset under each parallel layout, and its largest relative
difference in loss and gradient norm from one process: ``python -m haina.tools.bench.layouts``.

Each layout is a real ``haina pretrain --nproc-per-node N`` run; the step time is the median over the
logged steps after the first (which includes start-up work). Informational: on a 2-core machine, four
processes share two cores, so multi-process layouts measure communication and oversubscription more
than parallel speed. ``--only dp_shard=2,deepspeed`` compares the DeepSpeed ZeRO stages with FSDP2 (``dp_shard=2``
is the same data-parallel layout under the fsdp2 backend).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from haina.core.metrics import read_metrics

LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "1 process": (1, []),
    "dp_shard=2": (2, ["parallel.dp_shard=2"]),
    "dp_replicate=2 x dp_shard=2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "tp=2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp=2 sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp=2 1f1b": (2, ["parallel.pp=2"]),
    "pp=2 interleaved x2": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"]),
    "tp=2 sp x pp=2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp=2 sp x dp_shard=2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    **{
        f"deepspeed ZeRO-{stage}{' ' + name if name else ''}": (
            2, ["parallel.dp_backend=deepspeed", f"deepspeed.zero_stage={stage}", *extra]
        )
        for stage, name, extra in [
            (1, "", []), (2, "", []), (3, "", []),
            (2, "offload opt", ["deepspeed.offload_optimizer=true"]),
            (3, "offload opt+params", ["deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"]),
        ]
    },
}


def _data(folder: Path) -> Path:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = folder / "bench"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(300):
        doc = rng.integers(3, 512, size=int(rng.integers(40, 200))).tolist() + [2]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


def run_layout(folder: Path, data: Path, nproc: int, overrides: list[str], steps: int) -> list[dict]:
    run = folder / f"run{len(list(folder.iterdir()))}"
    command = [
        sys.executable, "-m", "haina.tools.cli", "pretrain", "--nproc-per-node", str(nproc), "--config", "tiny",
        f"train.run_dir={run}", f"data.prefixes=[{data}]", f"train.steps={steps}", "train.save_every=1000",
        "train.micro_batch_size=1", "train.global_batch_size=4", "model.num_layers=4", f"optim.decay_steps={steps}",
        "train.log_every=1", *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=600)
    return read_metrics(run)


def step_time(records: list[dict], nproc: int) -> float:
    """Median seconds per step after the first: tokens of a step over the run's tokens/s."""
    tokens_per_step = 4 * 64
    return statistics.median(tokens_per_step / (r["tokens_per_s"] * nproc) for r in records[1:])


def max_rel_diff(a: list[dict], b: list[dict], key: str) -> float:
    return max(abs(x[key] - y[key]) / max(abs(x[key]), 1e-12) for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="at least 2: the first step (compiling, warming) is not timed")
    parser.add_argument("--position", default="rope", choices=("rope", "alibi"))
    parser.add_argument("--only", default="", help="comma-separated name prefixes of the layouts to run after 1 process")
    parser.add_argument("--hidden", type=int, default=64, help="model.hidden_size (the tiny preset's is 64)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = _data(folder)
        print(f"{'layout':<30} {'procs':>5} {'step ms':>9} {'loss rel diff':>14} {'grad-norm rel diff':>19}")
        reference: list[dict] = []
        for name, (nproc, overrides) in LAYOUTS.items():
            if reference and args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            model = [f"model.position={args.position}", f"model.hidden_size={args.hidden}"]
            records = run_layout(folder, data, nproc, [*model, *overrides], args.steps)
            reference = reference or records
            ms = 1000 * step_time(records, nproc)
            loss, grad = max_rel_diff(reference, records, "loss"), max_rel_diff(reference, records, "grad_norm")
            print(f"{name:<30} {nproc:>5} {ms:>9.1f} {loss:>14.2e} {grad:>19.2e}", flush=True)


if __name__ == "__main__":
    main()
