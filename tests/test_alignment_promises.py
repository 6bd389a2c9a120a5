"""README promises of the alignment section, end to end on tiny runs: the safety evaluation's
``classifier:`` and ``reward-model:`` judges, the SFT quality gate (``sft.gate_reviews`` and its legacy
``align.gate_reviews``), and the frozen models of DPO (reference) and PPO (reference, reward model)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haina.core.checkpoint import load_model_weights
from haina.core.config import alignment_config, load_config
from haina.core.engine import Engine
from haina.core.model import Transformer
from haina.core.model_loading import load_model
from haina.core.tokenizer import load_tokenizer
from haina.tools.eval.safety import attack_prompts, replies_of
from tests.alignment_helpers import AlignmentData, records
from tests.cli_helpers import cli_here

# Every test trains through the CLI (the module's pretrain -> sft -> rm runs, then a run of its own).
pytestmark = pytest.mark.integration

SHORT = ("train.log_every=1", "train.save_every=100", "optim.warmup_steps=0")


@pytest.fixture(scope="module")
def runs(alignment_runs: dict) -> dict:
    """The session's pretrain -> sft -> rm runs of the tiny preset (tests/conftest.py)."""
    return alignment_runs


# ------------------------------------------------------------------------------------------ safety judges

def _attack_file(folder: Path, n: int = 16) -> tuple[Path, list[dict]]:
    items = attack_prompts("eval")[:n]
    path = folder / "attacks.jsonl"
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return path, items


def _by_hand_rates(items: list[dict], harmless: list[bool]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[bool]] = {}
    for it, ok in zip(items, harmless, strict=True):
        groups.setdefault(it["category"][-1], []).append(ok)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _check_report(report: dict, label: str, items: list[dict], replies: list[str], harmless: list[bool]) -> None:
    model = report["models"][label]
    assert [r["reply"] for r in model["responses"]] == replies, label  # greedy: the replies seen by hand
    assert [r["harmless"] for r in model["responses"]] == harmless, label
    assert model["overall"]["prompts"] == len(items)
    assert model["overall"]["harmless"] == pytest.approx(sum(harmless) / len(items))
    for category, rate in _by_hand_rates(items, harmless).items():
        assert model["by_category"][category]["harmless"] == pytest.approx(rate), (label, category)


CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")


def _words(reply: str) -> set[str]:
    """Lower-cased ASCII letter/digit runs of a reply (CJK characters split words)."""
    return set(re.findall(r"[a-z0-9]+", CJK.sub(" ", reply.lower())))


def test_safety_classifier_judge_flags_a_planted_word(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--judge classifier:PATH` with a safety model built to flag one word: a reply is harmful exactly
    when it contains that word, and the harmless rates are the counts of replies without it."""
    from haina.data_spark.features import featurize

    prompts, items = _attack_file(tmp_path)
    before = replies_of(str(runs["pt"]), items, 6, None)
    after = replies_of(str(runs["sft"]), items, 6, None)
    # The word in the most replies but not in all of them: both verdicts occur.
    counts: dict[str, int] = {}
    for reply in before + after:
        for w in _words(reply):
            counts[w] = counts.get(w, 0) + 1
    candidates = [w for w, c in counts.items() if c < len(before + after)]
    assert candidates, f"the replies give no word to flag: {before + after}"
    word = max(candidates, key=lambda w: (counts[w], w))

    size = 2**20
    weights = np.zeros(size, dtype=np.float32)
    ids, _ = featurize(word, size)  # the unigram feature of the word alone
    assert len(ids) == 1
    weights[ids[0]] = 1000.0
    model = tmp_path / "safety.npz"
    np.savez_compressed(model, weights=weights, intercept=np.array([-10.0]))

    out = tmp_path / "out"
    code, _, err = cli_here(capsys, "eval", "safety", "--checkpoint", str(runs["sft"]), "--compare", str(runs["pt"]),
                            "--prompts", str(prompts), "--judge", f"classifier:{model}", "--max-new-tokens", "6",
                            "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "safety.json").read_text(encoding="utf-8"))
    assert report["judge"] == f"classifier:{model}"
    flagged = {label: [word not in _words(r) for r in replies] for label, replies in (("before", before), ("after", after))}
    assert sum(flagged["before"] + flagged["after"]) not in (0, 2 * len(items))  # the judge said both
    _check_report(report, "before", items, before, flagged["before"])
    _check_report(report, "after", items, after, flagged["after"])


def test_safety_reward_model_judge_uses_the_reward_models_scores(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--judge reward-model:RUN --threshold T`: harmless exactly when the reward model's score of prompt +
    reply (recomputed here from the RM run's weights, on at most its train.seq_len last tokens) is at least
    T; T is set between two scores."""
    prompts, items = _attack_file(tmp_path)
    labels = {"before": runs["pt"], "after": runs["sft"]}
    replies = {label: replies_of(str(run), items, 6, None) for label, run in labels.items()}

    cfg, rm = load_model(runs["rm"], value_head=True)
    tok = load_tokenizer(cfg)
    scores: dict[str, list[float]] = {}
    with torch.no_grad():
        for label, texts in replies.items():
            scores[label] = []
            for it, reply in zip(items, texts, strict=True):
                ids = [tok.user_id, *tok.encode(it["prompt"][0]["content"]), tok.assistant_id,
                       *tok.encode(reply), tok.eos_id]
                ids = ids[-cfg.train.seq_len :]  # as in its training: the prompt loses its oldest tokens
                scores[label].append(float(rm(torch.tensor([ids]), logits=slice(None))[0, -1, 0]))
    ordered = sorted(scores["before"] + scores["after"])
    k = len(ordered) // 2
    while k < len(ordered) - 1 and ordered[k] - ordered[k - 1] < 1e-3:
        k += 1
    assert ordered[k] - ordered[k - 1] >= 1e-3, f"no gap between the scores to set a threshold in: {ordered}"
    threshold = (ordered[k - 1] + ordered[k]) / 2

    out = tmp_path / "out"
    code, _, err = cli_here(capsys, "eval", "safety", "--checkpoint", str(runs["sft"]), "--compare", str(runs["pt"]),
                            "--prompts", str(prompts), "--judge", f"reward-model:{runs['rm']}", "--threshold",
                            repr(threshold), "--max-new-tokens", "6", "--out", str(out))
    assert code == 0, err
    report = json.loads((out / "safety.json").read_text(encoding="utf-8"))
    for label in labels:
        _check_report(report, label, items, replies[label], [s >= threshold for s in scores[label]])
    total = sum(r["harmless"] for label in labels for r in report["models"][label]["responses"])
    assert total == len(ordered) - k  # the scores at or above the threshold


def test_safety_judge_errors_are_one_line(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for judge, message in (("classifier:" + str(tmp_path / "none.npz"), "needs the safety model file"),
                           ("reward-model:", "needs the reward model's run directory")):
        code, _, err = cli_here(capsys, "eval", "safety", "--checkpoint", str(runs["sft"]), "--judge", judge,
                                "--out", str(tmp_path / "out"))
        assert code == 2 and message in err and err.strip().count("\n") == 0, err


# ------------------------------------------------------------------------------------------- quality gate

KEPT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
DROPPED = [{"role": "user", "content": "Uppercase: snow"}, {"role": "assistant", "content": "SNOW and more snow"}]


def _gate_data(folder: Path) -> tuple[Path, Path]:
    """Batches A (4/4 accepted), B (2/4: rejected at 0.75), C (3/4: kept, exactly the threshold) and four
    items without a batch ("default", all accepted). Every kept item is the same conversation, B another."""
    items, verdicts = [], []
    for batch, accepted in (("A", 4), ("B", 2), ("C", 3), (None, 4)):
        for i in range(4):
            item_id = f"{batch or 'default'}{i}"
            item = {"id": item_id, "conversations": DROPPED if batch == "B" else KEPT}
            if batch:
                item["batch"] = batch
            items.append(item)
            verdicts.append({"id": item_id, "accept": i < accepted})
    data, reviews = folder / "sft.jsonl", folder / "reviews.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    reviews.write_text("".join(json.dumps(x) + "\n" for x in verdicts), encoding="utf-8")
    return data, reviews


def _reply_loss(model: Transformer, tok, turns: list[dict]) -> float:
    """Mean cross-entropy of the reply tokens and the eos after them, by hand from full logits."""
    prompt = [tok.user_id, *tok.encode(turns[0]["content"]), tok.assistant_id]
    ids = prompt + tok.encode(turns[1]["content"]) + [tok.eos_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), logits=slice(None))[0]
    return float(F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(ids[len(prompt) :])))


def test_sft_gate_drops_a_failed_batch_and_reports_it(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sft.gate_reviews`: the batch under the threshold is dropped whole before training (the first
    step's loss is the kept conversation's alone), the report is written and printed."""
    data, reviews = _gate_data(tmp_path)
    run_dir = tmp_path / "gated"
    code, stdout, err = cli_here(
        capsys, "sft", "--from", str(runs["pt"]), f"align.data={data}", f"sft.gate_reviews={reviews}",
        "sft.gate_sample=5", "sft.gate_threshold=0.75", f"train.run_dir={run_dir}", "train.steps=1",
        "train.micro_batch_size=8", *SHORT)  # 8 rows: more than the 16 conversations pack into
    assert code == 0, err
    report = json.loads((run_dir / "gate_report.json").read_text())
    assert report["threshold"] == 0.75 and report["kept_items"] == 12 and report["rejected_batches"] == ["B"]
    got = {b["batch"]: (b["items"], b["sampled"], b["accepted"], b["rate"], b["kept"]) for b in report["batches"]}
    assert got == {"A": (4, 4, 4, 1.0, True), "B": (4, 4, 2, 0.5, False), "C": (4, 4, 3, 0.75, True),
                   "default": (4, 4, 4, 1.0, True)}
    table = [line.split() for line in stdout.splitlines() if line.split()[:1] in (["A"], ["B"], ["C"], ["default"])]
    assert [row[-1] for row in table] == ["kept", "REJECTED", "kept", "kept"], stdout

    cfg, start = load_model(runs["pt"])
    tok = load_tokenizer(cfg)
    kept, dropped = _reply_loss(start, tok, KEPT), _reply_loss(start, tok, DROPPED)
    # The first step's 8 rows hold every packed row, so B's conversations, had they been kept, would move
    # the loss towards theirs (an ungated run's first loss was ~0.5 higher when this test was written).
    assert abs(kept - dropped) > 0.1
    assert records(run_dir)[0]["lm_loss"] == pytest.approx(kept, rel=1e-4)


def test_sft_gate_legacy_keys_and_rejecting_every_batch(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The previous release's keys (`align.gate_reviews`, `align.gate_sample`, `align.gate_threshold`)
    still run the gate; with every batch rejected the run stops with status 2 and one line, after
    writing the gate's report and before any checkpoint."""
    data, reviews = _gate_data(tmp_path)
    run_dir = tmp_path / "legacy"
    code, _, err = cli_here(capsys, "sft", "--from", str(runs["pt"]), f"align.data={data}",
                            f"align.gate_reviews={reviews}", "align.gate_sample=5", "align.gate_threshold=1.0",
                            f"train.run_dir={run_dir}", "train.steps=1", *SHORT)
    assert code == 0, err
    report = json.loads((run_dir / "gate_report.json").read_text())
    assert report["threshold"] == 1.0 and report["rejected_batches"] == ["B", "C"] and report["kept_items"] == 8

    strict = tmp_path / "reject-all.jsonl"
    strict.write_text("".join(json.dumps({"id": json.loads(line)["id"], "accept": False}) + "\n"
                              for line in reviews.read_text().splitlines()), encoding="utf-8")
    run_dir = tmp_path / "none-kept"
    code, _, err = cli_here(capsys, "sft", "--from", str(runs["pt"]), f"align.data={data}",
                            f"sft.gate_reviews={strict}", f"train.run_dir={run_dir}", "train.steps=1")
    assert code == 2, err[-2000:]
    # the tokenizer's note (400 pieces for 512 rows) may come first; the error is one line, the last
    errors = [line for line in err.splitlines() if line.startswith("haina sft:")]
    assert errors == [err.strip().splitlines()[-1]], err
    assert errors[0] == ("haina sft: error: sft.gate_reviews: the gate rejected every batch (A, B, C, default); "
                         f"nothing to train on (see {run_dir / 'gate_report.json'})"), err
    report = json.loads((run_dir / "gate_report.json").read_text())
    assert report["kept_items"] == 0 and report["rejected_batches"] == ["A", "B", "C", "default"]
    assert not list((run_dir / "checkpoints").glob("step_*"))


# ------------------------------------------------------------------------------------------ frozen models

def _spy_frozen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.nn.Module, str]]:
    """Every frozen model a run builds (Engine.prepare_frozen), with the checkpoint it was loaded from."""
    frozen: list[tuple[torch.nn.Module, str]] = []
    real = Engine.prepare_frozen

    def spy(self: Engine, module: torch.nn.Module, source: str | None) -> torch.nn.Module:
        part = real(self, module, source)
        frozen.append((part, str(source)))
        return part

    monkeypatch.setattr(Engine, "prepare_frozen", spy)
    return frozen


def _equals_source(module: torch.nn.Module, source: str) -> list[str]:
    """Names of ``module``'s parameters that differ from a fresh load of ``source`` (NaN-filled first, so
    anything the checkpoint does not hold differs too)."""
    fresh = copy.deepcopy(module)
    with torch.no_grad():
        for p in fresh.parameters():
            p.fill_(float("nan"))
    assert load_model_weights(source, fresh) == []
    theirs = dict(fresh.named_parameters())
    return [n for n, p in module.named_parameters() if not torch.equal(p.detach(), theirs[n].detach())]


def _response_logps(model: Transformer, tokens: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its response tokens, each predicted from the position before."""
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens, logits=slice(None)).float(), -1)
    token_logp = logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return (token_logp * response[:, 1:]).sum(-1)


def test_dpo_reference_stays_frozen(runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After three DPO steps the reference equals the SFT checkpoint exactly while the policy moved, and
    the implicit rewards logged at steps 2 and 3 are those of the step before's policy against the SFT
    weights (recomputed here from the checkpoints)."""
    from haina.core.train import train
    from haina.plugins.align.preference_data import PairBatches, read_pairs

    frozen = _spy_frozen(monkeypatch)
    data: AlignmentData = runs["data"]
    run_dir = tmp_path / "dpo"
    beta = 0.5
    cfg = alignment_config("dpo", str(runs["sft"]), None, [
        f"align.data={data.pairs}", f"train.run_dir={run_dir}", "train.steps=3", "train.save_every=1",
        "train.keep_checkpoints=0", "train.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-3", "optim.min_lr=1e-3",
        f"dpo.beta={beta}", "train.global_batch_size=2",
    ])
    train(cfg)
    assert [source for _, source in frozen] == [str(runs["sft"])]
    assert _equals_source(frozen[0][0], str(runs["sft"])) == []

    sft = Transformer(cfg.model)
    load_model_weights(runs["sft"], sft)
    policy = Transformer(cfg.model)
    load_model_weights(run_dir, policy)
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), sft.parameters(), strict=True))

    logged = records(run_dir)
    assert logged[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    batches = PairBatches(read_pairs(data.pairs), load_tokenizer(cfg), cfg.train.seq_len, 2, cfg.train.seed)
    for step in (2, 3):
        batch = batches.batch(step - 1)
        before = Transformer(cfg.model)
        load_model_weights(run_dir / "checkpoints" / f"step_{step - 1}", before)
        rewards = beta * (_response_logps(before, batch["tokens"], batch["response"])
                          - _response_logps(sft, batch["tokens"], batch["response"]))
        chosen, rejected = float(rewards[:2].mean()), float(rewards[2:].mean())
        assert abs(chosen) + abs(rejected) > 1e-4  # a reference that moved with the policy would log 0
        assert logged[step - 1]["chosen_reward"] == pytest.approx(chosen, rel=1e-4, abs=1e-6), step
        assert logged[step - 1]["rejected_reward"] == pytest.approx(rejected, rel=1e-4, abs=1e-6), step


def test_ppo_reference_and_reward_model_stay_frozen(runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After two PPO steps the reference equals the SFT checkpoint and the reward model the RM checkpoint
    exactly, while the actor (from SFT) and the critic (from the RM) moved; at both steps the rollouts'
    scores and reference log-probs are those of the two source checkpoints (recomputed here)."""
    from haina.core.train import train
    from haina.plugins.algorithms.ppo import PPO, ActorCritic

    frozen = _spy_frozen(monkeypatch)
    rollouts: list[dict] = []
    real_rollout = PPO.rollout

    def rollout(self: PPO, *args, **kwargs) -> dict:
        roll = real_rollout(self, *args, **kwargs)
        rollouts.append({k: roll[k] for k in ("tokens", "mask", "targets", "score", "ref_logp")})
        return roll

    monkeypatch.setattr(PPO, "rollout", rollout)
    data: AlignmentData = runs["data"]
    run_dir = tmp_path / "ppo"
    cfg = alignment_config("ppo", str(runs["sft"]), None, [
        f"ppo.reward_model={runs['rm']}", f"align.data={data.prompts}", f"train.run_dir={run_dir}", "train.steps=2",
        "ppo.critic_warmup_steps=0", "ppo.sampling.max_new_tokens=6", "optim.lr=1e-3", "optim.min_lr=1e-3", *SHORT,
    ])
    train(cfg)
    assert sorted(source for _, source in frozen) == sorted([str(runs["sft"]), str(runs["rm"])])
    for module, source in frozen:
        assert _equals_source(module, source) == [], source

    trained = ActorCritic(load_config(str(run_dir / "config.yaml")))
    load_model_weights(run_dir, trained)
    for part, source in (("actor", runs["sft"]), ("critic", runs["rm"])):
        start = copy.deepcopy(getattr(trained, part))
        load_model_weights(source, start)
        moved = [n for (n, p), q in zip(getattr(trained, part).named_parameters(), start.parameters(), strict=True)
                 if not torch.equal(p, q)]
        assert moved, f"the {part} did not train"

    _, sft = load_model(runs["sft"])
    _, rm = load_model(runs["rm"], value_head=True)
    vocab = load_tokenizer(cfg).vocab_size  # ids past the tokenizer's are outside the distribution
    logged = records(run_dir)
    assert len(rollouts) == len(logged) == 2
    for step, roll in enumerate(rollouts, start=1):
        tokens, mask = roll["tokens"].cpu(), roll["mask"].cpu()
        last = torch.tensor([int(row.nonzero().max()) + 1 for row in mask])  # the last response token
        with torch.no_grad():
            scores = rm(tokens, logits=slice(None))[..., 0].gather(1, last[:, None])[:, 0]
            logp = torch.log_softmax(sft(tokens, logits=slice(None))[..., :vocab].float(), -1)
        torch.testing.assert_close(roll["score"].cpu(), scores, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        targets = roll["targets"].cpu().clamp(min=0)
        ref = logp.gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close(roll["ref_logp"].cpu()[mask], ref[mask], atol=1e-4, rtol=1e-4, msg=f"step {step}")
        assert logged[step - 1]["reward"] == pytest.approx(float(scores.mean()), abs=1e-5)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6) and abs(logged[1]["kl"]) > 1e-6
