"""The alignment pieces against hand computations: chat masking and packing, the quality gate, pairwise
and DPO losses, GAE, PPO clipping, KL schedule, warm-up, the task generator and taxonomy coverage, and
the advantages and losses of GRPO, RLOO and REINFORCE++."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from haina.core.config import TokenizerConfig
from haina.core.errors import HainaError
from haina.plugins.align.advantages import (
    aggregate,
    clipped_policy_loss,
    global_masked_whiten,
    group_normalized_advantages,
    k3_kl,
    leave_one_out_advantages,
    returns_to_go,
    sequence_kl,
)
from haina.plugins.align.chat_format import (
    pack_conversations,
    read_conversations,
    render_conversation,
    render_prompt,
)
from haina.plugins.align.common import IGNORE, shifted_targets, token_logps
from haina.plugins.align.preference_losses import accuracy_by_bucket, dpo_loss, pairwise_loss
from haina.plugins.align.quality_gate import group_by_batch, spot_check
from haina.plugins.align.rl import (
    CriticWarmup,
    KLSchedule,
    gae,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)
from haina.plugins.align.taxonomy import DEFAULT_TAXONOMY, coverage_report, validate_path
from haina.tools.align_data import task
from haina.tools.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    lines = [p["prompt"][0]["content"] + " " + p["answer"] for p in task.make_prompts(2000, 0)]
    (folder / "t.txt").write_text("\n".join(lines), encoding="utf-8")
    return Tokenizer(train_tokenizer([folder / "t.txt"], folder / "t", TokenizerConfig(vocab_size=400, seed=1)))


# ---------------------------------------------------------------------------------------------- chat

def test_only_assistant_replies_and_their_eos_are_trained(tok: Tokenizer) -> None:
    turns = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "Uppercase: cat"}, {"role": "assistant", "content": "CAT"}]
    ids, labels = render_conversation(turns, tok)
    u, a, eos = tok.user_id, tok.assistant_id, tok.eos_id
    q1, r1, q2, r2 = (tok.encode(t["content"]) for t in turns)
    assert ids == [u, *q1, a, *r1, eos, u, *q2, a, *r2, eos]
    ignore = IGNORE
    assert labels == [ignore] * (1 + len(q1) + 1) + r1 + [eos] + [ignore] * (1 + len(q2) + 1) + r2 + [eos]
    assert render_prompt(turns[:1], tok) == [u, *q1, a]


def test_packing_keeps_conversations_apart(tok: Tokenizer) -> None:
    a = ([1, 10, 20, 30], [IGNORE, IGNORE, 20, 30])
    b = ([1, 40, 50], [IGNORE, 40, 50])
    long = (list(range(100, 112)), list(range(100, 112)))
    rows, stats = pack_conversations([a, b, long], seq_len=8, pad_id=0)
    assert stats.sequences == 2 and stats.truncated == 1 and stats.conversations == 3
    first = rows[0]
    assert first.tokens.tolist() == [1, 10, 20, 30, 1, 40, 50, 0]
    assert first.segments.tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert first.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    # position t predicts token t+1 of its own conversation: no target across the boundary (index 3)
    assert first.labels.tolist() == [IGNORE, 20, 30, IGNORE, 40, 50, IGNORE, IGNORE]
    assert rows[1].tokens.tolist() == list(range(100, 108))  # truncated to seq_len


def test_conversation_file_errors_name_the_line(tmp_path: Path) -> None:
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"conversations": []}): "non-empty list of turns",
        json.dumps({"conversations": [{"role": "robot", "content": "x"}]}): "each turn needs role",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}): "last turn must be the assistant",
        # what json.loads raises besides JSONDecodeError, and a string that is not text
        '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}": r"not valid JSON \(nested too deep\)",
        '{"a": ' + "7" * 5_000 + "}": "not valid JSON .*digits",
        json.dumps(good).replace('"hi"', '"\\ud800"'): "unpaired surrogate",
    }
    for line, message in cases.items():
        path = tmp_path / "c.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(HainaError, match=message) as info:
            read_conversations(path)
        assert f"{path}:2:" in str(info.value) and "\n" not in str(info.value)


def test_shifted_targets_and_token_logps() -> None:
    tokens = torch.tensor([[5, 6, 7, 0]])
    response = torch.tensor([[False, False, True, False]])
    targets = shifted_targets(tokens, response)
    assert targets.tolist() == [[IGNORE, 7, IGNORE, IGNORE]]
    logits = torch.zeros(1, 4, 8)
    logits[0, 1, 7] = math.log(3.0)  # p(7) = 3 / (3 + 7) at position 1
    assert token_logps(logits, targets)[0].tolist() == pytest.approx([0.0, math.log(0.3), 0.0, 0.0])


# -------------------------------------------------------------------------------------- quality gate

def test_quality_gate_rejects_weak_batches_and_reports(tmp_path: Path) -> None:
    items = [{"id": f"{b}{i}", "batch": b} for b in "AB" for i in range(10)]
    bad = {f"B{i}" for i in range(10) if i % 2}  # half of batch B is poor
    report = spot_check(group_by_batch(items), sample_size=6, threshold=0.8,
                        reviewer=lambda item: item["id"] not in bad, seed=3)
    verdicts = {b.batch: b for b in report.batches}
    assert verdicts["A"].kept and verdicts["A"].rate == 1.0 and verdicts["A"].sampled == 6
    assert not verdicts["B"].kept and verdicts["B"].rate < 0.8
    assert [i["batch"] for i in report.kept] == ["A"] * 10
    assert report.to_json()["rejected_batches"] == ["B"]
    again = spot_check(group_by_batch(items), 6, 0.8, lambda item: item["id"] not in bad, seed=3)
    assert again.to_json() == report.to_json()

    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text(json.dumps({"id": "A0", "accept": True}) + "\n")
    with pytest.raises(HainaError, match="no verdict for sampled item id"):
        spot_check(group_by_batch(items), 2, 0.5, reviews, seed=0)


# ---------------------------------------------------------------------------------- preference losses

def test_pairwise_loss_and_accuracy_buckets() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0)) + math.log(2.0)) / 3
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(expected, rel=1e-6)
    with_margin = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0)) + math.log1p(math.exp(1.0))) / 3
    assert float(pairwise_loss(chosen, rejected, torch.ones(3))) == pytest.approx(with_margin, rel=1e-6)
    buckets = accuracy_by_bucket(chosen, rejected, [1, 1, 5])
    assert buckets == {1: (0.5, 2), 5: (0.0, 1)}


def test_dpo_loss_by_hand() -> None:
    out = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), beta=0.5)
    # chosen reward 0.5 * 1 = 0.5, rejected 0.5 * -0.5 = -0.25, margin 0.75
    assert float(out.chosen_rewards) == pytest.approx(0.5) and float(out.rejected_rewards) == pytest.approx(-0.25)
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.75)), rel=1e-6)
    assert out.accuracy == 1.0


# ------------------------------------------------------------------------------------------------ PPO

def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.5, 1.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is past the response: ignored
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.6
    d1 = 0.5 + gamma * 0.6 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0], rel=1e-6)
    assert ret[0].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6, 0.0], rel=1e-6)


def test_kl_penalty_rewards_put_the_score_on_the_last_token() -> None:
    logp = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    rewards = kl_penalty_rewards(logp, ref, torch.tensor([2.0]), mask, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([0.0, 0.0, -0.1 * -0.5 + 2.0, 0.0])


def test_ppo_policy_loss_clips() -> None:
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.05, 0.5]]))  # ratios 1.5, 1.05, 0.5
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clip_fraction, _ = ppo_policy_loss(logp, old, adv, torch.ones(1, 3), clip=0.1)
    # per token max(-A r, -A clip(r)): -1.1 (clipped), -1.05, 0.9 (clipped)
    assert float(loss) == pytest.approx((-1.1 - 1.05 + 0.9) / 3, rel=1e-6)
    assert float(clip_fraction) == pytest.approx(2 / 3)


def test_ppo_value_loss_clips() -> None:
    values, old, returns = torch.tensor([[1.0, 0.05]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    loss, frac = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: plain (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: 0.0025 both
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.0025) / 2, rel=1e-6)
    assert float(frac) == pytest.approx(0.5)


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_kl_schedule_runs_from_start_to_end(shape: str) -> None:
    schedule = KLSchedule(0.2, 0.005, steps=50, shape=shape)
    values = [schedule(s) for s in range(60)]
    assert values[0] == pytest.approx(0.2) and values[49] == pytest.approx(0.005) and values[59] == pytest.approx(0.005)
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))
    assert schedule(25) != KLSchedule(0.2, 0.005, steps=50, shape="linear" if shape != "linear" else "cosine")(25)


def test_critic_warmup() -> None:
    warmup = CriticWarmup(20)
    assert not any(warmup.actor_trains(s) for s in range(20)) and warmup.actor_trains(20)


# --------------------------------------------------------------------------- GRPO, RLOO, REINFORCE++

def test_grpo_group_normalised_advantages_by_hand() -> None:
    """Two groups of 4: rewards 1, 0, 0, 1 (mean 0.5, sample std sqrt(1/3)) and four equal rewards (all 0)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert group_normalized_advantages(rewards, 4).tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], rel=1e-6)
    assert group_normalized_advantages(rewards, 4, std_normalize=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalized_advantages(rewards, 3)


def test_rloo_leave_one_out_baseline_by_hand() -> None:
    # sample 0's baseline is (2 + 6) / 2 = 4, sample 1's (1 + 6) / 2, sample 2's (1 + 2) / 2; a group of 2 is r_i - r_j
    assert leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0]), 3).tolist() == [-3.0, -1.5, 4.5]
    assert leave_one_out_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2).tolist() == [-2.0, 2.0, 0.0, 0.0]
    # RLOO's reward takes the sequence KL: sum over the response of log pi_old - log pi_ref
    logp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    assert sequence_kl(logp, ref, torch.tensor([[True, True, False]])).tolist() == [-0.5]


def test_reinforce_pp_returns_and_global_normalisation_by_hand() -> None:
    # per-token reward -beta (old - ref), the score on the last response token; discounted returns to go
    assert returns_to_go(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[1, 1, 1, 0]]), 0.5).tolist() == [
        [2.75, 3.5, 3.0, 0.0]
    ]
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    rewards = kl_penalty_rewards(old, ref, torch.tensor([1.0, 0.0]), mask, 0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.1, 0.0], [0.0, 0.0, 0.0]]))
    returns = returns_to_go(rewards, mask, 1.0)
    torch.testing.assert_close(returns, torch.tensor([[1.05, 1.1, 0.0], [0.0, 0.0, 0.0]]))
    # normalised over all four response tokens of the batch (population variance), 0 off the mask
    mean = (1.05 + 1.1) / 4
    std = math.sqrt((1.05**2 + 1.1**2) / 4 - mean**2 + 1e-8)
    want = [[(1.05 - mean) / std, (1.1 - mean) / std, 0.0], [-mean / std, -mean / std, 0.0]]
    torch.testing.assert_close(global_masked_whiten(returns, mask), torch.tensor(want))


def test_k3_kl_and_loss_aggregations_by_hand() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([-2.0, -1.0, -1.0])
    assert k3_kl(logp, ref).tolist() == pytest.approx([math.exp(-1), math.e - 2, 0.0])
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])  # NaN off the mask must not leak
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert float(aggregate(per_token, mask, "token_mean")) == pytest.approx(10 / 4)
    assert float(aggregate(per_token, mask, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(per_token, mask, "seq_mean_token_sum")) == pytest.approx((6 + 4) / 2)


def test_clipped_policy_loss_with_grpo_kl_by_hand() -> None:
    """Ratios 1.5 and 0.5 under advantages +1 and -1 with clip 0.2: the pessimistic (larger) term wins;
    GRPO's beta * k3 joins per token; each response's mean, then the mean over responses."""
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0])  # one advantage per response, broadcast over its tokens
    mask = torch.tensor([[True, True], [True, False]])
    ref = torch.zeros(2, 2)
    kl = k3_kl(logp, ref)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip=0.2, mode="seq_mean_token_mean", kl=kl, beta=0.1)
    # response 0 (A=+1): max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5; response 1 (A=-1): max(1.5, 1.2)
    k = [1 / 1.5 + math.log(1.5) - 1, 1 / 0.5 + math.log(0.5) - 1]
    want = ((-1.2 + 0.1 * k[0]) + (-0.5 + 0.1 * k[1])) / 2 / 2 + (1.5 + 0.1 * k[0]) / 2
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(1 / 3)  # only the first token clipped
    assert float(stats["kl_loss"]) == pytest.approx((k[0] + k[1]) / 2 / 2 + k[0] / 2, rel=1e-6)
    loss.backward()
    # d/dlogp: the clipped token gets only the KL gradient, beta (1 - ref/pi) = beta (1 - 1/ratio)
    g = logp.grad
    assert float(g[0, 0]) == pytest.approx(0.1 * (1 - 1 / 1.5) / 4, rel=1e-6)
    assert float(g[0, 1]) == pytest.approx((-1 * 0.5 + 0.1 * (1 - 1 / 0.5)) / 4, rel=1e-6)
    assert float(g[1, 0]) == pytest.approx((1.5 + 0.1 * (1 - 1 / 1.5)) / 2, rel=1e-6)
    assert float(g[1, 1]) == 0.0


def test_on_policy_clipped_loss_is_reinforce() -> None:
    """With the rollout policy's own log-probs (ratio 1) the gradient is -A per token, scaled by the
    aggregation: RLOO's token sum per response is REINFORCE on the sequence log-probability."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = clipped_policy_loss(logp, logp.detach(), adv, mask, 0.2, "seq_mean_token_sum")
    loss.backward()
    assert logp.grad.tolist() == [[-1.0, -1.0, -1.0], [0.5, 0.5, 0.0]]
    assert float(stats["clip_fraction"]) == 0.0 and float(stats["approx_kl"]) == 0.0


# ------------------------------------------------------------------------------------ task, taxonomy

def test_task_is_deterministic_and_verifiable() -> None:
    assert task.make_prompts(20, 1) == task.make_prompts(20, 1) != task.make_prompts(20, 2)
    pairs = task.preference_pairs(50, 3)
    assert all(p["chosen"] != p["rejected"] and 1 <= p["gap"] <= 5 for p in pairs)
    item = {"answer": "42"}
    assert task.reward(item, " 42 ") == 1.0 and task.reward(item, "it is 42") == 0.5 and task.reward(item, "41") == 0.0
    languages = {p["language"] for p in task.make_prompts(50, 0)}
    assert languages == {"en", "zh"}


def test_taxonomy_coverage() -> None:
    items = [{"category": ["math", "arithmetic", "addition"]}, {"category": "text/transform/reverse"},
             {"category": ["math", "nonsense"]}, {}]
    report = coverage_report(items, DEFAULT_TAXONOMY)
    assert report["unknown_category"] == 2
    assert report["counts"][0] == {"math": 1, "text": 1}
    assert report["top_share"]["math"] == 0.5 and report["top_share"]["code"] == 0.0
    assert "code" in report["uncovered"][0] and "math/arithmetic/addition" not in report["uncovered"][2]
    assert validate_path(["text", "transform"], DEFAULT_TAXONOMY) and not validate_path(["x"], DEFAULT_TAXONOMY)


def test_chat_batches_are_deterministic_and_cycle(tok: Tokenizer) -> None:
    from haina.plugins.align.chat_format import ChatBatches

    items = task.sft_conversations(30, 2)
    batches = ChatBatches(items, tok, seq_len=32, micro_batch_size=2, seed=4)
    again = ChatBatches(items, tok, seq_len=32, micro_batch_size=2, seed=4)
    first = batches.batch(0)
    assert {k: v.shape for k, v in first.items()} == {k: (2, 32) for k in ("tokens", "labels", "segments", "positions")}
    rows = len(batches.rows)
    for i in (0, 3, rows):  # past one pass over the rows it goes on with a fresh order
        assert all(torch.equal(batches.batch(i)[k], again.batch(i)[k]) for k in first)
    seen = {tuple(r.tolist()) for i in range((rows + 1) // 2) for r in batches.batch(i)["tokens"]}
    assert len(seen) == rows  # one pass visits every packed row


def test_whitening_and_entropy() -> None:
    from haina.plugins.align.rl import entropy_from_logits, masked_whiten

    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0 and float(w[0, :3].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float((w[0, :3] ** 2).mean()) == pytest.approx(1.0, rel=1e-4)
    assert float(entropy_from_logits(torch.zeros(1, 4))[0]) == pytest.approx(math.log(4))
    assert float(entropy_from_logits(torch.tensor([[50.0, 0.0, 0.0]]))[0]) == pytest.approx(0.0, abs=1e-6)


def test_wrong_answers_grow_with_the_gap() -> None:
    import random

    rng = random.Random(0)
    assert all(abs(int(task.wrong_answer("40", g, rng)) - 40) == g for g in range(1, 5))
    assert abs(int(task.wrong_answer("40", 5, rng)) - 40) >= 20
    assert sum(a != b for a, b in zip("tree", task.wrong_answer("tree", 2, rng), strict=True)) == 2
    with pytest.raises(HainaError, match="no items"):
        spot_check({"A": []}, 2, 0.5, lambda item: True)
