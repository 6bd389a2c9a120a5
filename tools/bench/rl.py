"""The alignment demo's RL stages, seed by seed: what each algorithm did to the policy, and what it cost.

    python -m haina.tools.bench.rl [--demo runs/demo] [--seeds 0 1 2] [--steps N] [--out runs/bench-rl]
                                   [--algorithms ppo grpo rloo reinforce_pp]

Starts from the SFT and reward-model runs a finished ``make demo`` left in ``--demo`` and reruns each of
its RL stages (:data:`haina.tools.demo.align.RL_STAGES`: PPO with the reward model plus the verifier, GRPO
with the verifier), and RLOO and REINFORCE++ with GRPO's settings, once per seed, each in a process of its
own so its peak memory is its own. For every
run it prints the demo's held-out evaluation (reward-model score, verified-answer rate, KL to the SFT
model; :func:`haina.tools.demo.align.evaluate_policy`) next to the SFT model's, the rollout and update
throughput (tokens/s, the mean over the logged steps) and the process's peak RSS, with its RSS after
imports beside it; then, per algorithm, the mean rise in verified answers and its seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")


def stage_overrides(algorithm: str) -> tuple[str, ...]:
    """The demo's overrides of a stage; the critic-free algorithms it does not run take GRPO's."""
    from haina.tools.demo.align import RL_STAGES

    if algorithm in RL_STAGES:
        return RL_STAGES[algorithm][1]
    return tuple(o.replace("grpo.", f"{algorithm}.", 1) for o in RL_STAGES["grpo"][1])


def rl_overrides(demo: Path, algorithm: str, seed: int, run_dir: Path, steps: int | None) -> list[str]:
    """The demo's overrides of one RL stage, with this run's directory, seed and (optionally) step count."""
    reward_model = [f"ppo.reward_model={demo / 'run-rm'}"] if algorithm == "ppo" else []
    extra: list[str] = []
    if steps is not None:  # shortened: PPO keeps the demo's share of critic warm-up steps (20 of 60)
        extra = [f"train.steps={steps}", *([f"ppo.critic_warmup_steps={steps // 3}"] if algorithm == "ppo" else [])]
    return [
        f"train.run_dir={run_dir}", "train.resume=false", f"train.seed={seed}", "train.progress=false",
        "train.log_every=1", "train.save_every=100000", *reward_model, f"align.data={demo / 'align_data' / 'prompts.jsonl'}",
        *stage_overrides(algorithm), *extra,
    ]


def child(demo: Path, algorithm: str, seed: int, run_dir: Path, steps: int | None) -> dict[str, float]:
    """One RL run in this process: its throughput and peak memory."""
    from haina.core.config import alignment_config
    from haina.core.metrics import read_metrics
    from haina.core.train import train

    cfg = alignment_config(algorithm, str(demo / "run-sft"), None, rl_overrides(demo, algorithm, seed, run_dir, steps))
    after_imports = _peak_rss_gib()
    train(cfg)
    records = [r for r in read_metrics(run_dir) if "rollout_tokens_per_s" in r]
    return {
        "rollout_tokens_per_s": sum(r["rollout_tokens_per_s"] for r in records) / len(records),
        "train_tokens_per_s": sum(r["train_tokens_per_s"] for r in records) / len(records),
        "peak_rss_gib": _peak_rss_gib(), "rss_after_imports_gib": after_imports,
    }


def run(
    demo: Path, seeds: Sequence[int], steps: int | None, out: Path, console: Console,
    algorithms: Sequence[str] = ALGORITHMS,
) -> dict[str, Any]:
    from haina.core.config import load_config
    from haina.tools.demo.align import evaluate_policy

    sft, rm, heldout = demo / "run-sft", demo / "run-rm", demo / "align_data" / "prompts_heldout.jsonl"
    for needed in (sft / "config.yaml", rm / "config.yaml", heldout):
        if not needed.is_file():
            raise SystemExit(f"--demo {demo}: {needed} is missing; run `make demo` (or `haina demo`) first")
    cfg = load_config(str(sft / "config.yaml"))
    base = evaluate_policy(cfg, sft, "", rm, sft, heldout)
    rows: list[dict[str, Any]] = []
    for algorithm in algorithms:
        for seed in seeds:
            run_dir = out / f"{algorithm}-{seed}"
            console.print(f"{algorithm} seed {seed} ...")
            proc = subprocess.run(
                [sys.executable, "-m", "haina.tools.bench.rl", "--child", algorithm, "--demo", str(demo),
                 "--seeds", str(seed), "--out", str(out), *(["--steps", str(steps)] if steps is not None else [])],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{algorithm} seed {seed} failed:\n{proc.stderr[-3000:]}")
            costs = json.loads(proc.stdout.strip().splitlines()[-1])
            prefix = "actor." if algorithm == "ppo" else ""
            rows.append({"algorithm": algorithm, "seed": seed, **costs,
                         **evaluate_policy(cfg, run_dir, prefix, rm, sft, heldout, seed=seed)})
    console.print(_table(base, rows))
    summary = _summary(base, rows)
    for algorithm, s in summary.items():
        console.print(f"{algorithm}: verified answers {base['verified']:.3f} -> mean {s['verified_mean']:.3f} "
                      f"(rise {s['rise_mean']:+.3f}, seed-to-seed spread {s['spread']:.3f} over {s['seeds']} seeds)")
    return {"sft": base, "runs": rows, "summary": summary}


def _table(base: dict[str, float], rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"RL from the demo's SFT model (SFT: RM score {base['rm_score']:.3f}, verified "
                        f"{base['verified']:.3f})")
    for column in ("algorithm", "seed", "RM score", "verified", "KL to SFT", "rollout tok/s", "update tok/s",
                   "peak RSS GiB", "RSS after imports"):
        table.add_column(column, justify="left" if column == "algorithm" else "right")
    for r in rows:
        table.add_row(r["algorithm"], str(r["seed"]), f"{r['rm_score']:.3f}", f"{r['verified']:.3f}", f"{r['kl']:.3f}",
                      f"{r['rollout_tokens_per_s']:.0f}", f"{r['train_tokens_per_s']:.0f}", f"{r['peak_rss_gib']:.2f}",
                      f"{r['rss_after_imports_gib']:.2f}")
    return table


def _summary(base: dict[str, float], rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        verified = [r["verified"] for r in rows if r["algorithm"] == algorithm]
        mean = sum(verified) / len(verified)
        out[algorithm] = {"verified_mean": mean, "rise_mean": mean - base["verified"],
                          "spread": max(verified) - min(verified), "seeds": len(verified)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo's work directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: the demo's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rl"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        seed = args.seeds[0]
        print(json.dumps(child(args.demo, args.child, seed, args.out / f"{args.child}-{seed}", args.steps)))
        return 0
    result = run(args.demo, args.seeds, args.steps, args.out, Console(width=140), args.algorithms)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
