"""The alignment half of the demo: SFT -> reward model -> PPO on a task the project can verify.

Starts from the pretraining demo's run and tokenizer, generates the arithmetic / string-transformation
task in English and Chinese, and prints the reward model's held-out accuracy and the policy's reward
(reward-model score and verified answers) on held-out prompts before and after PPO.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from haina.core.config import HainaConfig, alignment_config, load_config
from haina.tools import alignment_task as task

# Sized for a few minutes on two CPU cores with the demo preset.
SFT = ("train.steps=300", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=20")
RM = ("train.steps=150", "optim.lr=5e-4", "optim.min_lr=5e-5", "optim.warmup_steps=10")
PPO = (
    "train.steps=60", "align.ppo.critic_warmup_steps=20", "optim.lr=5e-5", "optim.min_lr=5e-5",
    "optim.warmup_steps=0", "optim.clip_grad=0.5", "align.sampling.max_new_tokens=8", "align.sampling.top_k=20",
    "train.micro_batch_size=16", "train.global_batch_size=16",
)
COMMON = ("train.log_every=10", "train.save_every=1000", "train.progress=true")


def write_task(folder: Path) -> dict[str, Path]:
    return {
        "sft": task.write_jsonl(task.sft_conversations(2000, 1), folder / "sft.jsonl"),
        "pairs": task.write_jsonl(task.preference_pairs(1500, 2), folder / "pairs.jsonl"),
        "eval_pairs": task.write_jsonl(task.preference_pairs(200, 3), folder / "pairs_eval.jsonl"),
        "prompts": task.write_jsonl(task.make_prompts(400, 4), folder / "prompts.jsonl"),
        "heldout_prompts": task.write_jsonl(task.make_prompts(64, 5), folder / "prompts_heldout.jsonl"),
    }


@torch.no_grad()
def policy_reward(cfg: HainaConfig, policy: Path, source_prefix: str, rm_run: Path, prompts: Path) -> dict[str, float]:
    """Greedy replies of a checkpointed policy to held-out prompts: mean reward-model score and task reward."""
    from haina.core.checkpoint import load_model_weights
    from haina.core.generate import Sampling, generate
    from haina.core.model import Transformer
    from haina.plugins.alignment import load_tokenizer
    from haina.plugins.chat import render_prompt
    from haina.plugins.preference_data import read_prompts
    from haina.plugins.reward import last_token_scores, value_config

    tok = load_tokenizer(cfg)
    actor = Transformer(cfg.model).eval()
    load_model_weights(policy, actor, source_prefix=source_prefix)
    rm = Transformer(value_config(cfg)).eval()
    load_model_weights(rm_run, rm)
    items = read_prompts(prompts)
    ids = [render_prompt(it["prompt"], tok) for it in items]
    replies = generate(
        actor, ids, Sampling(max_new_tokens=8, temperature=0), eos_id=tok.eos_id, vocab_limit=tok.vocab_size
    )
    rows = [p + r for p, r in zip(ids, replies, strict=True)]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    scores = last_token_scores(rm, tokens, torch.tensor([len(r) - 1 for r in rows]))
    texts = [tok.decode([t for t in r if t != tok.eos_id]) for r in replies]
    verified = [task.reward(it, text) for it, text in zip(items, texts, strict=True)]
    return {"rm_score": float(scores.mean()), "task_reward": sum(verified) / len(verified)}


def run_alignment_demo(workdir: Path, pretrain_run: Path, console: Console) -> dict[str, Any]:
    from haina.core.metrics import read_metrics
    from haina.core.train import train

    data = write_task(workdir / "align_data")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, source: Path, *overrides: str) -> Path:
        console.rule(f"[bold]{name}")
        run = workdir / f"run-{name}"
        cfg = alignment_config(name, str(source), None, [f"train.run_dir={run}", "train.resume=false", *COMMON, *overrides])
        t0 = time.perf_counter()
        train(cfg)
        timings[name] = time.perf_counter() - t0
        return run

    sft = stage("sft", pretrain_run, f"align.data={data['sft']}", *SFT)
    rm = stage("rm", sft, f"align.data={data['pairs']}", f"align.eval_data={data['eval_pairs']}", *RM)
    ppo = stage("ppo", sft, f"align.reward_model={rm}", f"align.data={data['prompts']}", *PPO)

    cfg = load_config(str(sft / "config.yaml"))
    before = policy_reward(cfg, sft, "", rm, data["heldout_prompts"])
    after = policy_reward(cfg, ppo, "actor.", rm, data["heldout_prompts"])
    rm_eval = json.loads((rm / "rm_eval.json").read_text())
    ppo_records = read_metrics(ppo)
    table = Table(title="alignment demo")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("reward model held-out accuracy", f"{rm_eval['accuracy']:.3f} ({rm_eval['pairs']} pairs)")
    for gap, bucket in rm_eval["by_gap"].items():
        table.add_row(f"  score gap {gap}", f"{bucket['accuracy']:.3f} ({bucket['pairs']})")
    table.add_row("policy RM score: SFT -> PPO", f"{before['rm_score']:.3f} -> {after['rm_score']:.3f}")
    table.add_row("verified answers: SFT -> PPO", f"{before['task_reward']:.3f} -> {after['task_reward']:.3f}")
    table.add_row("PPO rollout reward: first -> last logged", f"{ppo_records[0]['reward']:.3f} -> {ppo_records[-1]['reward']:.3f}")
    table.add_row("PPO rollout tokens/s", f"{ppo_records[-1]['rollout_tokens_per_s']:.0f}")
    table.add_row("PPO training tokens/s", f"{ppo_records[-1]['train_tokens_per_s']:.0f}")
    for name, seconds in timings.items():
        table.add_row(f"time: {name}", f"{seconds:.1f} s")
    console.print(table)
    rose = after["rm_score"] > before["rm_score"]
    console.print(f"PPO {'raised' if rose else 'did NOT raise'} the reward-model score on held-out prompts "
                  f"({before['rm_score']:.3f} -> {after['rm_score']:.3f}).")
    summary = {
        "rm_heldout_accuracy": rm_eval["accuracy"], "rm_by_gap": rm_eval["by_gap"],
        "policy_before": before, "policy_after": after, "timings_s": timings,
        "ppo_rollout_tokens_per_s": ppo_records[-1]["rollout_tokens_per_s"],
        "ppo_train_tokens_per_s": ppo_records[-1]["train_tokens_per_s"],
    }
    (workdir / "alignment_summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"alignment took {time.perf_counter() - started:.0f} s")
    return summary
