"""The alignment half of the demo: SFT -> response collection -> reward model -> PPO -> safety evaluation.

Starts from the pretraining demo's run and tokenizer, generates the arithmetic / string-transformation
task in English and Chinese (plus refusals to the training half of the attack set), fine-tunes, reports the
prompt pool's taxonomy coverage, collects responses from the pretrained and the fine-tuned model on a
stratified sample of prompts, turns them into preference pairs with the task's verifier, trains the reward
model on those and the generated pairs, runs PPO, and prints the reward model's held-out accuracy, the
policy's reward before and after PPO, and the harmless rate per safety category of the three models.
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
from haina.core.generate import Sampling, generate
from haina.core.metrics import read_metrics
from haina.core.model_loading import load_model
from haina.core.tokenizer import load_tokenizer
from haina.core.train import train
from haina.plugins.algorithms.reward_model import last_token_scores
from haina.plugins.align.chat_format import render_prompt
from haina.plugins.align.preference_data import read_prompts
from haina.plugins.align.taxonomy import DEFAULT_TAXONOMY
from haina.tools.align_data import task
from haina.tools.align_data.collect import collect, load_collect_config
from haina.tools.align_data.pairs import build_pairs
from haina.tools.align_data.prompts import coverage, format_coverage_report, read_items, stratified_sample
from haina.tools.demo.size import FULL, DemoSize
from haina.tools.eval.safety import (
    attack_prompts,
    evaluate_safety,
    format_safety_table,
    plot_safety,
    refusal_conversations,
)

# Sized for a few minutes on two CPU cores with the demo preset.
SFT = ("train.steps=300", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=20")
RM = ("train.steps=150", "optim.lr=5e-4", "optim.min_lr=5e-5", "optim.warmup_steps=10")
PPO = (
    "train.steps=60", "ppo.critic_warmup_steps=20", "optim.lr=5e-5", "optim.min_lr=5e-5",
    "optim.warmup_steps=0", "optim.clip_grad=0.5", "ppo.sampling.max_new_tokens=8", "ppo.sampling.top_k=20",
    "train.micro_batch_size=16", "train.global_batch_size=16",
)
COMMON = ("train.log_every=10", "train.save_every=1000", "train.progress=true")


def write_task(folder: Path, size: DemoSize = FULL) -> dict[str, Path]:
    return {
        "sft": task.write_jsonl(task.sft_conversations(size.sft_conversations, 1) + refusal_conversations(),
                                folder / "sft.jsonl"),
        "pairs": task.write_jsonl(task.preference_pairs(size.pairs, 2), folder / "pairs.jsonl"),
        "eval_pairs": task.write_jsonl(task.preference_pairs(size.eval_pairs, 3), folder / "pairs_eval.jsonl"),
        "prompts": task.write_jsonl(task.make_prompts(size.prompts, 4), folder / "prompts.jsonl"),
        "pool": task.write_jsonl(task.make_prompts(size.pool, 6), folder / "prompt_pool.jsonl"),
        "heldout_prompts": task.write_jsonl(task.make_prompts(size.heldout_prompts, 5), folder / "prompts_heldout.jsonl"),
    }


@torch.no_grad()
def policy_reward(cfg: HainaConfig, policy: Path, source_prefix: str, rm_run: Path, prompts: Path) -> dict[str, float]:
    """Greedy replies of a checkpointed policy to held-out prompts: mean reward-model score and task reward."""
    tok = load_tokenizer(cfg)
    _, actor = load_model(policy, prefix=source_prefix)
    _, rm = load_model(rm_run, value_head=True)
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


def run_alignment_demo(workdir: Path, pretrain_run: Path, console: Console, size: DemoSize = FULL) -> dict[str, Any]:
    data = write_task(workdir / "align_data", size)
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

    sft = stage("sft", pretrain_run, f"align.data={data['sft']}", *SFT, *size.sft)
    t0 = time.perf_counter()
    collected = collect_pairs(workdir / "align_data", data["pool"], {"pretrain": pretrain_run, "sft": sft}, console,
                              size.collect_sample)
    timings["collect"] = time.perf_counter() - t0
    rm_pairs = task.write_jsonl(collected["pairs"] + task.preference_pairs(size.pairs, 2), workdir / "align_data" / "rm_pairs.jsonl")
    rm = stage("rm", sft, f"align.data={rm_pairs}", f"align.eval_data={data['eval_pairs']}", *RM, *size.rm)
    ppo = stage("ppo", sft, f"ppo.reward_model={rm}", f"align.data={data['prompts']}", *PPO, *size.ppo)

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
    t0 = time.perf_counter()
    safety = safety_table(workdir, {"pretrain": pretrain_run, "sft": sft, "ppo": ppo}, console)
    timings["safety eval"] = time.perf_counter() - t0
    console.print(verdict(before, after))
    summary = {
        "rm_heldout_accuracy": rm_eval["accuracy"], "rm_by_gap": rm_eval["by_gap"],
        "policy_before": before, "policy_after": after, "timings_s": timings,
        "collected_pairs": len(collected["pairs"]), "collected_responses": collected["responses"],
        "prompt_coverage": collected["coverage"], "safety_harmless": safety,
        "ppo_rollout_tokens_per_s": ppo_records[-1]["rollout_tokens_per_s"],
        "ppo_train_tokens_per_s": ppo_records[-1]["train_tokens_per_s"],
    }
    (workdir / "alignment_summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"alignment took {time.perf_counter() - started:.0f} s")
    return summary


def verdict(before: dict[str, float], after: dict[str, float]) -> str:
    """What PPO did on the held-out prompts, in words: each measure's direction, and plainly which fell.

    A policy can please the reward model while getting answers wrong; the verified-answer rate is what
    matters, so the line leads with it and never calls a fall in it a success."""
    def move(name: str, key: str) -> str:
        a, b = before[key], after[key]
        word = "rose" if b > a else "fell" if b < a else "stayed"
        return f"{name} {word} ({a:.3f} -> {b:.3f})"

    text = f"PPO on held-out prompts: {move('verified answers', 'task_reward')}; {move('reward-model score', 'rm_score')}."
    if after["task_reward"] < before["task_reward"]:
        text += " The policy got fewer answers right: PPO did not improve it."
    return text


def collect_pairs(
    folder: Path, pool: Path, models: dict[str, Path], console: Console, sample_size: int = 240
) -> dict[str, Any]:
    """Coverage of the prompt pool, a stratified sample of it, responses of every model with a greedy and a
    sampled setting, and the verifier's preference pairs (haina prompts / rm collect / rm pairs)."""
    import yaml

    console.rule("[bold]prompt taxonomy and response collection")
    items = read_items(pool)
    report = coverage(items, DEFAULT_TAXONOMY, min_count=20)
    console.print(format_coverage_report(report))
    sample = task.write_jsonl(stratified_sample(items, sample_size, 0, DEFAULT_TAXONOMY), folder / "collect_prompts.jsonl")
    config = {
        "prompts": str(sample), "out": str(folder / "responses.jsonl"), "batch_size": 48,
        "models": [{"name": name, "checkpoint": str(run)} for name, run in models.items()],
        "settings": [{"name": "greedy", "temperature": 0, "max_new_tokens": 8},
                     {"name": "sampled", "temperature": 1.0, "top_k": 20, "max_new_tokens": 8, "samples": 2}],
    }
    (folder / "collect.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    collect(load_collect_config(folder / "collect.yaml"), progress=False)
    records = read_items(folder / "responses.jsonl")
    pairs = build_pairs(records, {r["id"]: task.reward(r, r["response"]) for r in records})
    task.write_jsonl(pairs, folder / "collected_pairs.jsonl")
    console.print(f"{len(records)} responses from {', '.join(models)} -> {len(pairs)} preference pairs "
                  f"(verifier-scored) in {folder / 'collected_pairs.jsonl'}")
    return {"pairs": pairs, "responses": len(records),
            "coverage": {lv: report["levels"][i]["covered"] for i, lv in enumerate(("top", "middle", "leaf"))}}


def safety_table(workdir: Path, models: dict[str, Path], console: Console) -> dict[str, float]:
    """Harmless rate per safety category on the held-out attack prompts (refusal judge), with a plot."""
    console.rule("[bold]safety evaluation (held-out attack prompts)")
    prefixes = {"ppo": "actor."}
    report = evaluate_safety({k: (str(v), prefixes.get(k, "")) for k, v in models.items()}, attack_prompts("eval"),
                             "refusal", max_new_tokens=12)
    (workdir / "safety.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    plot_safety(report, workdir / "safety.png")
    console.print(format_safety_table(report))
    console.print(f"safety report and plot: {workdir / 'safety.json'}, {workdir / 'safety.png'}")
    return {label: m["overall"]["harmless"] for label, m in report["models"].items()}
