"""GRPO, RLOO, REINFORCE++ and PPO train in one process on the verifiable task, with rewards from plugins
(a verifier function and rules, no reward model): two steps each from a tiny checkpoint, metrics logged,
the actor moved, and the rollout policy's log-probabilities taken once when one update uses them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from haina.core.checkpoint import load_model_weights
from haina.core.config import TokenizerConfig, load_config
from haina.core.model import Transformer
from haina.core.train import train
from haina.tools.align_data import task
from haina.tools.tokenizer import train_tokenizer
from tests.conftest import tiny_config


def answer_reward(response: str, answer: str) -> float:
    """The task's check, in the verifier's calling convention."""
    return task.reward({"answer": answer}, response)


def variety(response: str) -> float:
    """Distinct characters: a score an untrained model's samples differ in, so advantages are not all 0."""
    return len(set(response)) / 10


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Path]:
    """A tokenizer with the chat tokens, task prompts, and a one-step checkpoint of the tiny model."""
    root = tmp_path_factory.mktemp("rl")
    lines = [p["prompt"][0]["content"] + " " + p["answer"] for p in task.make_prompts(1500, 0)]
    (root / "tok.txt").write_text("\n".join(lines), encoding="utf-8")
    tokenizer = train_tokenizer([root / "tok.txt"], root / "tok", TokenizerConfig(vocab_size=400, seed=1))
    prompts = task.write_jsonl(task.make_prompts(40, 4), root / "prompts.jsonl")
    train(tiny_config(root / "pt", tiny_data, "train.steps=1", "optim.warmup_steps=0"))
    return {"root": root, "tokenizer": Path(tokenizer), "prompts": prompts, "pt": root / "pt"}


def _run(start: dict[str, Path], name: str, algorithm: str, *overrides: str) -> list[dict]:
    run_dir = start["root"] / name
    cfg = load_config("tiny", [
        f"algorithm={algorithm}", f"align.init_from={start['pt']}", f"align.data={start['prompts']}",
        f"align.tokenizer={start['tokenizer']}", f"train.run_dir={run_dir}", "train.steps=2", "train.save_every=100",
        "optim.warmup_steps=0", "optim.lr=1e-4", "optim.min_lr=1e-4", f"{algorithm}.sampling.max_new_tokens=4",
        *overrides,
    ])
    train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    return records


VERIFIER = "[{type: verifier, name: answer, function: 'tests.test_rl_algorithms:answer_reward'}, " \
           "{type: verifier, name: variety, function: 'tests.test_rl_algorithms:variety'}, " \
           "{type: length, max_length: 6, buffer: 4, weight: 0.1}]"
SHARED = {"reward", "reward_std", "reward/answer", "reward/variety", "reward/length", "entropy", "clip_fraction",
          "generator_logp_gap",
          "approx_kl", "response_length", "truncated", "rollout_tokens_per_s", "train_tokens_per_s"}


@pytest.mark.parametrize(("algorithm", "extra", "own"), [
    ("grpo", ["grpo.n_samples=2"], {"kl", "kl_loss", "flat_groups"}),
    ("rloo", ["rloo.n_samples=2", "rloo.epochs=2"], {"kl", "reward_with_kl"}),
    ("reinforce_pp", ["reinforce_pp.n_samples=2", "reinforce_pp.beta=0"], {"return"}),
])
def test_critic_free_algorithm_trains(start: dict[str, Path], algorithm: str, extra: list[str], own: set[str]) -> None:
    records = _run(start, algorithm, algorithm, f"{algorithm}.reward={VERIFIER}", *extra)
    assert SHARED | own <= set(records[-1]), sorted(set(records[-1]))
    for r in records:
        assert 0.0 <= r["reward/answer"] <= 1.0 and -1.0 <= r["reward/length"] <= 0.0
        total = r["reward/answer"] + r["reward/variety"] + 0.1 * r["reward/length"]
        assert r["reward"] == pytest.approx(total, abs=1e-5) and r["reward_std"] > 0
        assert r["generator_logp_gap"] < 1e-4  # the generator's log-probs are the training engine's
        if algorithm == "grpo":  # one update per rollout: the ratio is exactly 1, nothing clips
            assert r["approx_kl"] == 0.0 and r["clip_fraction"] == 0.0
    assert max(r["grad_norm"] for r in records) > 1e-6  # the rewards differ, so there is something to learn
    if algorithm == "rloo":  # the second update compares with the rollout policy's log-probs, taken once
        assert records[0]["approx_kl"] > 0
    if algorithm == "reinforce_pp":  # beta 0: no reference model, no KL
        assert "kl" not in records[-1]
    cfg = load_config(str(start["root"] / algorithm / "config.yaml"))
    trained, before = Transformer(cfg.model), Transformer(cfg.model)
    load_model_weights(start["root"] / algorithm, trained)
    load_model_weights(start["pt"], before)
    assert not torch.equal(trained.layers["0"].mlp.up_proj.weight, before.layers["0"].mlp.up_proj.weight)


def test_ppo_takes_reward_plugins_and_starts_its_critic_from_the_actor(start: dict[str, Path]) -> None:
    """No reward model: the reward is a verifier, the critic the actor's start with a fresh value head."""
    records = _run(start, "ppo", "ppo", f"ppo.reward={VERIFIER}", "ppo.critic_warmup_steps=1", "ppo.epochs=1")
    assert {"reward", "reward/answer", "reward/variety", "kl", "entropy", "value_loss", "policy_loss"} <= set(records[-1])
    assert [r["actor_trains"] for r in records] == [0.0, 1.0]
    assert records[0]["approx_kl"] == 0.0  # the rollout's log-probs and the update's agree exactly
