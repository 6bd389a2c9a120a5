"""The alignment half of the demo: SFT -> response collection -> reward model -> PPO and GRPO -> evaluation.

Starts from the pretraining demo's run and tokenizer, generates the arithmetic / string-transformation
task in English and Chinese (plus refusals to the training half of the attack set), fine-tunes, reports the
prompt pool's taxonomy coverage, collects responses from the pretrained and the fine-tuned model on a
stratified sample of prompts, turns them into preference pairs with the task's verifier, trains the reward
model on those and the generated pairs, and runs two RL algorithms from the SFT model: PPO with the reward
model plus the verifier, and GRPO with the verifier alone. It prints, for the SFT model and each RL policy,
the reward model's score, the verified-answer rate and the KL to the SFT model on held-out prompts, says
plainly which of them went down, and the harmless rate per safety category of every model.

The SFT conversations carry a systematic annotator error (a ``miscount`` share of the letter counts is one
too many), as human-written demonstrations do: imitation learns it, and a reward that checks answers can
undo it. That is the gap RL has to close here; addition, which the small model gets mostly wrong, is not
something a few dozen RL steps teach it, and the table shows that too.
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
from haina.plugins.align.common import IGNORE
from haina.plugins.align.preference_data import read_prompts
from haina.plugins.align.rollout import padded_rows
from haina.plugins.align.taxonomy import DEFAULT_TAXONOMY
from haina.plugins.align.token_logprobs import model_token_logps
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
VERIFIER = "{type: verifier, name: verified, function: 'haina.tools.align_data.task:verify'"
RL = ("optim.lr=5e-5", "optim.min_lr=5e-5", "optim.warmup_steps=0", "optim.clip_grad=0.5",
      "train.micro_batch_size=16", "train.global_batch_size=16")
PPO = (
    "train.steps=60", "ppo.critic_warmup_steps=20", "ppo.sampling.max_new_tokens=8", "ppo.sampling.top_k=20",
    f"ppo.reward=[{{type: model, name: rm}}, {VERIFIER}, weight: 4}}]", *RL,
)
GRPO = ("train.steps=60", "grpo.sampling.max_new_tokens=8", "grpo.sampling.top_k=20", f"grpo.reward=[{VERIFIER}}}]", *RL)
RL_STAGES = {"ppo": ("reward model + 4 x verifier", PPO), "grpo": ("verifier", GRPO)}
COMMON = ("train.log_every=10", "train.save_every=1000", "train.progress=true")
MAX_NEW_TOKENS = 8


def write_task(folder: Path, size: DemoSize = FULL) -> dict[str, Path]:
    sft = task.sft_conversations(size.sft_conversations, 1, miscount=size.miscount) + refusal_conversations()
    return {
        "sft": task.write_jsonl(sft, folder / "sft.jsonl"),
        "pairs": task.write_jsonl(task.preference_pairs(size.pairs, 2), folder / "pairs.jsonl"),
        "eval_pairs": task.write_jsonl(task.preference_pairs(size.eval_pairs, 3), folder / "pairs_eval.jsonl"),
        "prompts": task.write_jsonl(task.make_prompts(size.prompts, 4), folder / "prompts.jsonl"),
        "pool": task.write_jsonl(task.make_prompts(size.pool, 6), folder / "prompt_pool.jsonl"),
        "heldout_prompts": task.write_jsonl(task.make_prompts(size.heldout_prompts, 5), folder / "prompts_heldout.jsonl"),
    }


@torch.no_grad()
def evaluate_policy(
    cfg: HainaConfig, policy: Path, prefix: str, rm_run: Path | None, reference: Path, prompts: Path, seed: int = 0
) -> dict[str, float]:
    """A checkpointed policy on held-out prompts: its greedy replies' reward-model score and verified-answer
    rate (exactly the answer), and its KL to ``reference`` (the SFT model): the mean over prompts of
    sum_t log pi - log ref on replies sampled from the policy at temperature 1, an unbiased estimate.
    Without ``rm_run`` there is no reward-model score."""
    tok = load_tokenizer(cfg)
    _, actor = load_model(policy, prefix=prefix)
    items = read_prompts(prompts)
    ids = [render_prompt(it["prompt"], tok) for it in items]
    options = {"eos_id": tok.eos_id, "vocab_limit": tok.vocab_size}
    greedy = generate(actor, ids, Sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=0), **options)
    result: dict[str, float] = {}
    if rm_run is not None:
        tokens, _, lengths = padded_rows(ids, greedy)
        _, rm = load_model(rm_run, value_head=True)
        result["rm_score"] = float(last_token_scores(rm, tokens, torch.tensor(lengths) - 1).mean())
    texts = [tok.decode([t for t in r if t != tok.eos_id]) for r in greedy]
    verified = [task.verify(text, it["answer"]) == 1.0 for it, text in zip(items, texts, strict=True)]
    sampled = generate(actor, ids, Sampling(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=seed), **options)
    tokens, targets, _ = padded_rows(ids, sampled)
    logp = model_token_logps(actor, tokens, targets, cfg.loss.chunk_size, vocab_limit=tok.vocab_size).logp
    if reference == policy and not prefix:
        ref_logp = logp
    else:
        _, ref = load_model(reference)
        ref_logp = model_token_logps(ref, tokens, targets, cfg.loss.chunk_size, vocab_limit=tok.vocab_size).logp
    kl = torch.where(targets != IGNORE, logp - ref_logp, 0.0).sum(-1).mean()
    return {**result, "verified": sum(verified) / len(verified), "kl": float(kl)}


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
    policies = {"sft": (sft, "")}
    for name, (_, overrides) in RL_STAGES.items():
        reward_model = (f"ppo.reward_model={rm}",) if name == "ppo" else ()
        run = stage(name, sft, *reward_model, f"align.data={data['prompts']}", *overrides, *getattr(size, name))
        policies[name] = (run, "actor." if name == "ppo" else "")

    cfg = load_config(str(sft / "config.yaml"))
    t0 = time.perf_counter()
    results = {name: evaluate_policy(cfg, run, prefix, rm, sft, data["heldout_prompts"])
               for name, (run, prefix) in policies.items()}
    timings["evaluation"] = time.perf_counter() - t0
    rm_eval = json.loads((rm / "rm_eval.json").read_text())
    console.print(rl_table(results, {name: read_metrics(run) for name, (run, _) in policies.items() if name != "sft"}))
    table = Table(title="alignment demo")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("reward model held-out accuracy", f"{rm_eval['accuracy']:.3f} ({rm_eval['pairs']} pairs)")
    for gap, bucket in rm_eval["by_gap"].items():
        table.add_row(f"  score gap {gap}", f"{bucket['accuracy']:.3f} ({bucket['pairs']})")
    for name, seconds in timings.items():
        table.add_row(f"time: {name}", f"{seconds:.1f} s")
    console.print(table)
    t0 = time.perf_counter()
    safety = safety_table(workdir, {"pretrain": (pretrain_run, ""), **policies}, console)
    timings["safety eval"] = time.perf_counter() - t0
    for name in RL_STAGES:
        console.print(verdict(name.upper(), results["sft"], results[name]))
    summary = {
        "rm_heldout_accuracy": rm_eval["accuracy"], "rm_by_gap": rm_eval["by_gap"], "policies": results,
        "timings_s": timings, "collected_pairs": len(collected["pairs"]), "collected_responses": collected["responses"],
        "prompt_coverage": collected["coverage"], "safety_harmless": safety,
        "throughput": {name: {k: read_metrics(run)[-1][k] for k in ("rollout_tokens_per_s", "train_tokens_per_s")}
                       for name, (run, _) in policies.items() if name != "sft"},
    }
    (workdir / "alignment_summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"alignment took {time.perf_counter() - started:.0f} s")
    return summary


def rl_table(results: dict[str, dict[str, float]], records: dict[str, list[dict[str, Any]]]) -> Table:
    """The SFT model and each RL policy on held-out prompts, with the rollout reward first -> last logged."""
    table = Table(title="RL on held-out prompts (greedy replies; KL on sampled replies)")
    for column in ("policy", "reward", "RM score", "verified answers", "KL to SFT", "rollout reward"):
        table.add_column(column, justify="left" if column in ("policy", "reward") else "right")
    for name, r in results.items():
        rec = records.get(name)
        table.add_row(
            name, RL_STAGES[name][0] if name in RL_STAGES else "-", f"{r['rm_score']:.3f}", f"{r['verified']:.3f}",
            f"{r['kl']:.3f}", f"{rec[0]['reward']:.3f} -> {rec[-1]['reward']:.3f}" if rec else "-",
        )
    return table


def verdict(name: str, before: dict[str, float], after: dict[str, float]) -> str:
    """What an RL algorithm did on the held-out prompts, in words: each measure's direction, and plainly which
    fell. A policy can please the reward model while getting answers wrong; the verified-answer rate is what
    matters, so the line leads with it and never calls a fall in it a success."""
    def move(label: str, key: str) -> str:
        a, b = before[key], after[key]
        word = "rose" if b > a else "fell" if b < a else "stayed"
        return f"{label} {word} ({a:.3f} -> {b:.3f})"

    text = (f"{name} on held-out prompts: {move('verified answers', 'verified')}; "
            f"{move('reward-model score', 'rm_score')}; KL to the SFT model {after['kl']:.3f}.")
    if after["verified"] < before["verified"]:
        text += f" The policy got fewer answers right: {name} did not improve it."
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


def safety_table(workdir: Path, models: dict[str, tuple[Path, str]], console: Console) -> dict[str, float]:
    """Harmless rate per safety category on the held-out attack prompts (refusal judge), with a plot;
    ``models``: label -> (run, checkpoint prefix of the policy)."""
    console.rule("[bold]safety evaluation (held-out attack prompts)")
    report = evaluate_safety({k: (str(run), prefix) for k, (run, prefix) in models.items()}, attack_prompts("eval"),
                             "refusal", max_new_tokens=12)
    (workdir / "safety.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    plot_safety(report, workdir / "safety.png")
    console.print(format_safety_table(report))
    console.print(f"safety report and plot: {workdir / 'safety.json'}, {workdir / 'safety.png'}")
    return {label: m["overall"]["harmless"] for label, m in report["models"].items()}
