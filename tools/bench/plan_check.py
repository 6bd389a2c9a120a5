"""The planner against measured peaks: small configs and layouts trained on CPU, each rank's peak of
tensor memory measured, printed beside what ``haina plan`` predicts for the same config and layout.

    python -m haina.tools.bench.plan_check [--only NAME,...] [--steps 3]

How the peak is measured, and why this way: CPU has no allocator statistics (``torch.cuda.max_memory_allocated``
has no CPU twin), and a process's RSS is the wrong quantity: it counts the interpreter, imported
libraries, glibc's arenas and pages it has not returned, and it never falls, so it bounds the peak
from above by tens of MB that no planner term stands for. A TorchDispatchMode that watches op outputs
sees most tensors but misses FSDP2's parameter and gradient buffers, which it allocates and frees by
resizing storages outside any op. The torch profiler with ``profile_memory=True`` records every
allocation and free of c10's CPU allocator with its address, size, time and the ops it happened under,
whoever makes it (ops, storage resizes, autograd, FSDP2, DeepSpeed, the collectives' output tensors). The
live set, kept by address, at its largest is this process's peak of tensor memory, the quantity
``max_memory_allocated`` reports on GPU. By address and not as a running sum of the events: a tensor
freed on a thread the profiler does not watch (gloo's workers drop the last reference to a collective's
buffers) leaves no free event, and a running sum would keep it forever (on ``tp=2`` that inflated the
peak by 10 MiB, 15%); an address handed out again must have been freed, so its earlier allocation is
retired then. Tensors that existed before the run started are not counted, and neither is memory outside
c10 (numpy index arrays of the dataset, gloo's own buffers), which the planner does not model either. Peak RSS growth is printed too, for comparison, not for the verdict.

Each config is a real ``train(cfg)`` (one process, or two under torchrun with gloo) for a few steps,
with checkpoint writing switched off (the planner plans a step, not a save); SFT and DPO start from a
tokenizer, data and a checkpoint made first. The target is within 10% on every rank; runs take seconds
each, all of them about four minutes on two cores; the last run's table is in docs/plan.md.
``HAINA_PLAN_CHECK_EXPLAIN=1`` prints, per rank, the allocations alive at the peak by the ops that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL = ["model.hidden_size=256", "model.num_heads=4", "model.num_layers=4", "model.vocab_size=4096",
         "model.max_seq_len=256", "tokenizer.vocab_size=4096", "model.attention=sdpa"]
BASE = [*MODEL, "train.seq_len=256", "train.micro_batch_size=2", "loss.chunk_size=256", "train.log_every=1",
        "train.save_every=1000", "train.progress=false", "optim.warmup_steps=1"]

# name -> (processes, overrides); each adds to BASE on the tiny preset
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "1 proc fp32": (1, []),
    "1 proc fp32 full AC": (1, ["parallel.activation_checkpoint=full"]),
    "1 proc bf16 2 micro-batches": (1, ["train.precision=bf16", "train.global_batch_size=4"]),
    "1 proc fp32 alibi selective": (1, ["model.position=alibi", "parallel.activation_checkpoint=selective"]),
    "dp_shard=2 bf16": (2, ["parallel.dp_shard=2", "train.precision=bf16"]),
    "dp_shard=2 fp32 no reshard prefetch 2": (2, ["parallel.dp_shard=2", "parallel.reshard_after_forward=false",
                                                  "parallel.fsdp_prefetch=2"]),
    "tp=2 sp fp32": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp=2 1f1b fp32": (2, ["parallel.pp=2", "train.micro_batch_size=1", "train.global_batch_size=4"]),
    "deepspeed ZeRO-2 fp32": (2, ["parallel.dp_backend=deepspeed", "deepspeed.zero_stage=2",
                                  "deepspeed.reduce_bucket_size=2000000", "deepspeed.allgather_bucket_size=2000000"]),
    "deepspeed ZeRO-3 fp32": (2, ["parallel.dp_backend=deepspeed", "deepspeed.zero_stage=3",
                                  "deepspeed.reduce_bucket_size=2000000", "deepspeed.allgather_bucket_size=2000000"]),
    # alignment: {placeholders} are the inputs made by _alignment_inputs (a tokenizer, data, a start checkpoint)
    "sft 1 proc fp32 (packed, masked sdpa)": (1, ["algorithm=sft", "align.data={sft}", "align.tokenizer={tok}"]),
    "dpo 1 proc fp32 (policy + reference)": (1, ["algorithm=dpo", "align.data={pairs}", "align.tokenizer={tok}",
                                                 "align.init_from={init}", "train.micro_batch_size=1"]),
}


def _data(folder: Path, vocab: int = 4096) -> Path:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = folder / "plan"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(200):
        doc = rng.integers(3, vocab, size=int(rng.integers(100, 600))).tolist() + [2]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


def _alignment_inputs(folder: Path, data: Path) -> dict[str, str]:
    """A tokenizer with the chat role tokens, SFT conversations, preference pairs whose replies fill
    ``train.seq_len`` (so every row is as wide as the planner assumes), and a start checkpoint."""
    import json as json_module
    import random

    from haina.core.config import TokenizerConfig
    from haina.tools.align_data import task
    from haina.tools.tokenizer import train_tokenizer

    lines = [p["prompt"][0]["content"] + " " + p["answer"] for p in task.make_prompts(2000, 5)]
    (folder / "tok.txt").write_text("\n".join(lines), encoding="utf-8")
    tok = train_tokenizer([folder / "tok.txt"], folder / "tok", TokenizerConfig(vocab_size=400, seed=1))
    sft = task.write_jsonl(task.sft_conversations(200, 1), folder / "sft.jsonl")
    rng = random.Random(0)
    pairs = [{**p, "chosen": " ".join(rng.choices(task.WORDS, k=300)), "rejected": " ".join(rng.choices(task.WORDS, k=300))}
             for p in task.preference_pairs(50, 2)]
    (folder / "pairs.jsonl").write_text("".join(json_module.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    init = folder / "init"
    command = [sys.executable, "-m", "haina.tools.cli", "pretrain", "--config", "tiny", *BASE, f"train.run_dir={init}",
               f"data.prefixes=[{data}]", "train.steps=1", "train.save_every=1", "train.async_save=false"]
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"start checkpoint failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {"tok": str(tok), "sft": str(sft), "pairs": str(folder / "pairs.jsonl"), "init": str(init)}


def _filled(overrides: list[str], inputs: dict[str, str]) -> list[str]:
    return [o.format(**inputs) if "{" in o else o for o in overrides]


# ---------------------------------------------------------------------------------------- the worker

Allocation = tuple[int, int, int, str]  # (time ns, address, +bytes allocated / -bytes freed, where)


def allocations(prof: Any) -> list[Allocation]:
    """Every CPU allocation and free the profiler saw, in time order, with the ops it happened under."""
    from torch._C._profiler import _EventType

    found: list[Allocation] = []

    def walk(nodes: Any) -> None:
        for node in nodes:
            if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
                chain, parent = [], node.parent
                while parent is not None and len(chain) < 4:
                    chain.append(parent.name[:40])
                    parent = parent.parent
                f = node.extra_fields
                found.append((node.start_time_ns, f.ptr, f.alloc_size, " < ".join(chain)))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    return sorted(found)


def live_peak(events: list[Allocation]) -> tuple[int, dict[int, tuple[int, str]], int]:
    """(largest live bytes, the allocations live then, frees that were never recorded).

    Live memory is tracked by address, not as a running sum of the events: a tensor freed on a thread the
    profiler does not watch (gloo's workers drop the last reference to a collective's buffers) has no free
    event, and a running sum would keep it forever. An address allocated again must have been freed, so
    its earlier allocation is retired then."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = lost = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for _, ptr, size, where in events:
        if size > 0:
            if ptr in live:
                lost += 1
                total -= live[ptr][0]
            live[ptr] = (size, where)
            total += size
        elif ptr in live:
            total -= live.pop(ptr)[0]
        if total > peak:
            peak, at_peak = total, dict(live)
    return peak, at_peak, lost


def explain(at_peak: dict[int, tuple[int, str]], top: int = 25) -> list[str]:
    """The allocations live at the peak, summed by the ops they were made under (a debugging aid for the
    planner's terms: ``HAINA_PLAN_CHECK_EXPLAIN=1``)."""
    by_site: dict[str, list[int]] = {}
    for size, where in at_peak.values():
        by_site.setdefault(where, []).append(size)
    biggest = sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [f"  {sum(sizes) / 2**20:8.2f} MiB  {len(sizes):>3} x  {where}" for where, sizes in biggest]


def _worker(overrides: list[str], out: Path) -> None:
    """Train under the profiler; write this rank's measured peak (and RSS growth) to ``out``-RANK.json."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from haina.core.config import load_config
    from haina.core.engine import Engine
    from haina.core.parallel.zero import ZeroEngine
    from haina.core.train import train

    cfg = load_config("tiny", overrides)
    Engine.save = lambda self, manager, trainer, block=False: None  # type: ignore[method-assign, assignment]
    ZeroEngine.save = Engine.save  # type: ignore[method-assign]
    torch.manual_seed(0)
    rss_before = _rss_kib()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        train(cfg)
    peak, at_peak, lost = live_peak(allocations(prof))
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("HAINA_PLAN_CHECK_EXPLAIN"):
        lines = [f"peak {peak / 2**20:.1f} MiB, {lost} unrecorded frees; live at the peak:", *explain(at_peak)]
        print("\n".join(f"rank {rank}: {line}" for line in lines), file=sys.stderr)
    result = {"rank": rank, "peak_bytes": peak, "unrecorded_frees": lost,
              "rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024}
    Path(f"{out}-{rank}.json").write_text(json.dumps(result))


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# ----------------------------------------------------------------------------------------- the driver

def measure(name: str, nproc: int, overrides: list[str], folder: Path, data: Path, steps: int) -> list[dict[str, Any]]:
    run = folder / name.replace(" ", "_").replace("=", "")
    full = [*BASE, *overrides, f"train.run_dir={run}", f"data.prefixes=[{data}]", f"train.steps={steps}",
            f"optim.decay_steps={steps}"]
    out = folder / f"{run.name}-peak"
    worker = ["-m", "haina.tools.bench.plan_check", "--worker", str(out), *full]
    command = [sys.executable, *worker] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: training failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    for line in proc.stderr.splitlines():
        if line.startswith("rank ") and ": " in line and "MiB" in line:
            print(f"  {name}: {line}", file=sys.stderr)
    return [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(nproc)]


def planned(overrides: list[str], nproc: int) -> dict[int, float]:
    """The planner's tensor peak per global rank (every rank of a pipeline stage plans alike)."""
    from haina.core.config import load_config
    from haina.core.parallel.mesh import MESH_DIMS
    from haina.tools.plan.gpus import CPU
    from haina.tools.plan.memory import plan_memory

    plan = plan_memory(load_config("tiny", [*BASE, *overrides]), nproc, CPU)
    layout = plan.layout
    per_stage = {r.pp_rank: r.peak.total for r in plan.ranks}
    ranks_per_stage = layout.world_size // layout.pp  # pp is the outermost mesh dimension
    assert MESH_DIMS[0] == "pp"
    return {rank: per_stage[rank // ranks_per_stage] for rank in range(nproc)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per config (at least 2: the optimizer "
                        "states exist from the first step's update on)")
    parser.add_argument("--only", default="", help="comma-separated name prefixes of the configs to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.overrides, Path(args.worker))
        return []
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = _data(folder)
        print(f"{'config':<40} {'rank':>4} {'measured MiB':>13} {'planned MiB':>12} {'planned/measured':>17} "
              f"{'RSS growth MiB':>15}")
        inputs: dict[str, str] = {}
        for name, (nproc, overrides) in CONFIGS.items():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            if any("{" in o for o in overrides) and not inputs:
                inputs = _alignment_inputs(folder, data)
            overrides = _filled(overrides, inputs)
            plan = planned(overrides, nproc)
            for r in measure(name, nproc, overrides, folder, data, args.steps):
                ratio = plan[r["rank"]] / r["peak_bytes"]
                rows.append({"config": name, "rank": r["rank"], "measured": r["peak_bytes"], "planned": plan[r["rank"]],
                             "ratio": ratio, "rss_growth": r["rss_growth_bytes"]})
                flag = "" if abs(ratio - 1) <= 0.10 else "  <- outside 10%"
                print(f"{name:<40} {r['rank']:>4} {r['peak_bytes'] / 2**20:>13.1f} {plan[r['rank']] / 2**20:>12.1f} "
                      f"{ratio:>17.3f} {r['rss_growth_bytes'] / 2**20:>15.1f}{flag}", flush=True)
    within = sum(abs(r["ratio"] - 1) <= 0.10 for r in rows)
    print(f"{within} of {len(rows)} ranks within 10%")
    return rows


if __name__ == "__main__":
    main()
