"""Meta-device construction against build-then-shard: per-rank memory and time to the first step.

    python -m haina.tools.bench.meta_build [--layers 16 --hidden 2048 --nproc 2] [--json]

Two CPU processes (gloo, ``parallel.dp_shard=2``) build a ~0.94B-parameter model (hidden 2,048, 16 layers,
SwiGLU 5,504, vocabulary 32,000) two ways, each in a fresh ``torchrun``:

- ``meta`` (what every command does): the model is created on the meta device, cut by the layout (FSDP2
  here), and only this rank's shards are allocated and initialised (:func:`haina.core.materialize.materialize`);
- ``whole`` (the old path): every rank builds and initialises the whole fp32 model, then FSDP2 shards it.

With ``--backend deepspeed`` the same two ways under ZeRO-3 (``parallel.dp_backend=deepspeed``):
``meta`` is :func:`haina.core.parallel.zero.build_partitioned` (each module materialised, initialised and
partitioned in turn), ``whole`` builds the whole model and hands it to ``deepspeed.zero.Init`` as
``deepspeed.initialize`` would; the workers stop once the model is partitioned (no step).

Each rank then builds its optimizer and runs one training step. Printed per rank: the peak RSS when
the model is laid out (before the optimizer), the peak RSS after the first step, the bytes of model
parameters it holds, and the seconds from start to the end of the first step. Both arms start from the
same weights (the initial values do not depend on the layout), which the workers check by a checksum of
their shards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = ("meta", "whole")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.hidden // 128}",
        f"model.ffn_hidden_size={args.ffn}", f"model.vocab_size={args.vocab}", "model.max_seq_len=64", "train.seq_len=64",
        "train.micro_batch_size=1", "parallel.dp_shard=-1", "loss.chunk_size=64",
    ]


def worker(arm: str, out: Path, overrides: list[str]) -> None:
    """One rank of one arm: build, lay out, optimizer, one step; the numbers to ``out-RANK.json``."""
    start = time.perf_counter()
    import torch

    from haina.core.algorithm import algorithm_class
    from haina.core.config import load_config
    from haina.core.distributed import init_distributed
    from haina.core.model import build_model
    from haina.core.optim import build_optimizer
    from haina.core.parallel.mesh import build_mesh, resolve_layout
    from haina.core.placement import lay_out

    cfg = load_config("tiny", overrides)
    imported = _peak_rss_gib()  # the interpreter, torch and haina: the same in both arms
    device = torch.device("cpu")
    init_distributed(device)
    layout = resolve_layout(cfg, int(os.environ["WORLD_SIZE"]))
    mesh = build_mesh(layout, "cpu")
    algorithm = algorithm_class(cfg)(cfg)
    model = build_model(cfg, torch.device("meta") if arm == "meta" else device)
    if cfg.parallel.dp_backend == "deepspeed":
        _zero3_worker(arm, out, cfg, layout, model, device, imported, start)
        return
    (part,), _ = lay_out(model, cfg, layout, mesh, device, stage_loss=algorithm)
    del model
    laid_out = _peak_rss_gib()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in part.parameters()]
    model_bytes = sum(t.numel() * t.element_size() for t in local)
    checksum = float(sum(t.double().sum() for t in local))
    optimizer = build_optimizer(part, cfg.optim)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len + 1), generator=generator)
    out_loss = algorithm.loss(part, (tokens[:, :-1], tokens[:, 1:]))
    out_loss.loss.backward()
    optimizer.step()
    rank = int(os.environ["RANK"])
    result = {
        "arm": arm, "rank": rank, "imports_rss_gib": imported, "laid_out_peak_rss_gib": laid_out, "step_peak_rss_gib": _peak_rss_gib(),
        "model_gib": model_bytes / 2**30, "seconds_to_first_step": time.perf_counter() - start,
        "checksum": checksum, "loss": float(out_loss.loss),
    }
    Path(f"{out}-{rank}.json").write_text(json.dumps(result))


def _zero3_worker(arm: str, out: Path, cfg: Any, layout: Any, model: Any, device: Any, imported: float,
                  start: float) -> None:
    """One rank of a ZeRO-3 arm: the model partitioned, built module by module or whole first."""
    from haina.core.parallel.zero import build_partitioned, deepspeed_config
    from haina.core.parallel.zero_state import import_deepspeed

    if arm == "meta":
        build_partitioned(model, cfg, layout, device)
    else:
        deepspeed = import_deepspeed(device)
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(verbose=False)
        deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config(cfg, layout))
    laid_out = _peak_rss_gib()
    local = [p.ds_tensor for p in model.parameters()]
    rank = int(os.environ["RANK"])
    result = {
        "arm": arm, "rank": rank, "imports_rss_gib": imported, "laid_out_peak_rss_gib": laid_out,
        "step_peak_rss_gib": float("nan"), "model_gib": sum(t.numel() * t.element_size() for t in local) / 2**30,
        "seconds_to_first_step": float("nan"), "checksum": float(sum(t.double().sum() for t in local)),
    }
    Path(f"{out}-{rank}.json").write_text(json.dumps(result))


def run_arm(arm: str, nproc: int, overrides: list[str], folder: Path) -> list[dict[str, Any]]:
    out = folder / arm
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "haina.tools.bench.meta_build", "--worker", arm, str(out), *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm}: failed: {proc.stderr.strip().splitlines()[-3:]}")
    return [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(nproc)]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--backend", choices=("fsdp2", "deepspeed"), default="fsdp2",
                        help="deepspeed: ZeRO-3, the model partitioned as built against built whole first")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), rest)
        return []
    overrides = _overrides(args)
    if args.backend == "deepspeed":
        overrides += ["parallel.dp_backend=deepspeed", "deepspeed.zero_stage=3",
                      f"train.global_batch_size={args.nproc}"]
    import torch

    from haina.core.config import load_config
    from haina.core.model import Transformer, count_parameters

    with torch.device("meta"):
        n = count_parameters(Transformer(load_config("tiny", overrides).model))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="haina-meta-build-") as tmp:
        for arm in ARMS:
            rows += run_arm(arm, args.nproc, overrides, Path(tmp))
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    sharding = "ZeRO-3" if args.backend == "deepspeed" else f"parallel.dp_shard={args.nproc} (FSDP2)"
    print(f"{n / 1e9:.2f}B parameters, {args.nproc} processes, {sharding}, gloo")
    print(f"{'arm':6} {'rank':>4} {'shards GiB':>10} {'RSS imports':>11} {'peak RSS laid out':>18} "
          f"{'peak RSS step 1':>16} {'s to step 1':>12}")
    for r in rows:
        print(f"{r['arm']:6} {r['rank']:>4} {r['model_gib']:>10.2f} {r['imports_rss_gib']:>11.2f} "
              f"{r['laid_out_peak_rss_gib']:>18.2f} {r['step_peak_rss_gib']:>16.2f} {r['seconds_to_first_step']:>12.1f}")
    by = {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}

    def built(arm: str) -> float:  # peak RSS for the model, above what imports took
        return max(r["laid_out_peak_rss_gib"] - r["imports_rss_gib"] for r in by[arm])

    ratio = built("meta") / built("whole")
    same = all(abs(a["checksum"] - b["checksum"]) <= 1e-6 * max(1.0, abs(b["checksum"]))
               for a, b in zip(by["meta"], by["whole"], strict=True))
    print(f"model memory at lay-out (peak RSS above imports), meta / whole: {built('meta'):.2f} / "
          f"{built('whole'):.2f} GiB = {ratio:.2f}; same initial shards: {same}")
    return rows


if __name__ == "__main__":
    main()
