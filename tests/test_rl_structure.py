"""The rollout and update structure of the RL algorithms: the generation seam (token ids and their
log-probabilities), packed rows that give the model's own per-token values, rollouts in micro-batches that
draw the same samples, and updates in shuffled mini-batches over several epochs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from haina.core.config import ConfigError, ModelConfig, load_config
from haina.core.generate import Generation, Generator, ModelGenerator, Sampling, generate, sample
from haina.core.model import Transformer
from haina.core.train import train
from haina.plugins.align.common import IGNORE
from haina.plugins.align.packing import model_inputs, pack_rows
from haina.plugins.align.rollout import SamplingSettings, mini_batch_rows, sample_rollout
from haina.plugins.align.token_logprobs import model_token_logps
from tests import test_rl_algorithms

VERIFIER = test_rl_algorithms.VERIFIER
start = test_rl_algorithms.start  # its module fixture: a tokenizer, task prompts and a tiny checkpoint


def _model(position: str = "rope") -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64,
                                    position=position))
    model.init_weights()
    return model.eval()


def test_sampled_log_probs_are_the_models_at_the_sampling_temperature() -> None:
    model = _model()
    prompts = [[5, 6, 7], [9, 10]]
    drawn = sample(model, prompts, Sampling(max_new_tokens=5, temperature=0.7, top_k=8, seed=3), eos_id=1,
                   row_seeds=[11, 12])
    assert [g.ids for g in drawn] == generate(model, prompts, Sampling(max_new_tokens=5, temperature=0.7, top_k=8),
                                              eos_id=1, row_seeds=[11, 12])
    for prompt, g in zip(prompts, drawn, strict=True):
        row = torch.tensor([prompt + g.ids])
        logits = model(row, logits=slice(None))[0, len(prompt) - 1 : -1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(g.ids)[:, None])[:, 0]
        # the full distribution at the temperature, not the top-k cut the token was drawn from
        assert torch.allclose(torch.tensor(g.logprobs), expected, atol=1e-5)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_packed_rows_give_each_rows_own_log_probs(position: str) -> None:
    model = _model(position)
    torch.manual_seed(1)
    lengths = torch.tensor([9, 3, 5, 12, 4, 2])
    tokens = torch.randint(2, 64, (6, 12))
    cols = torch.arange(12)
    tokens = torch.where(cols < lengths[:, None], tokens, 0)
    targets = torch.where(cols[:-1] < lengths[:, None] - 1, tokens[:, 1:], IGNORE)
    targets = torch.cat([targets, torch.full((6, 1), IGNORE)], 1)
    packed = pack_rows(tokens, targets, lengths)
    assert packed.tokens.shape[0] < 6  # fewer rows: 12 + (9, 3) + (5, 4, 2) fit in three
    assert torch.equal(packed.unpack(packed.tokens), tokens)
    plain = model_token_logps(model, tokens, targets, 16).logp
    inputs = model_inputs(tokens, targets, lengths, pack=True)
    logp = inputs.unpack(model_token_logps(model, inputs.tokens, inputs.targets, 16, positions=inputs.positions,
                                           segments=inputs.segments).logp)
    assert torch.allclose(logp, plain, atol=1e-5) and (plain != 0).sum() == (lengths - 1).sum()


def test_mini_batches_partition_the_rows_alike_on_every_call() -> None:
    parts = mini_batch_rows(10, 3, seed=5)
    assert sorted(torch.cat(parts).tolist()) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]
    assert all(torch.equal(a, b) for a, b in zip(parts, mini_batch_rows(10, 3, seed=5), strict=True))
    assert not torch.equal(torch.cat(parts), torch.cat(mini_batch_rows(10, 3, seed=6)))
    assert torch.equal(mini_batch_rows(4, 1, seed=5)[0], torch.arange(4))


class Recording(Generator):
    """A generator that records what the rollout asks of it and samples through haina's loop."""

    calls: list[tuple[str, Any]] = []

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        self.inner = ModelGenerator(tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)

    def sync(self, model: torch.nn.Module) -> None:
        Recording.calls.append(("sync", model))
        self.inner.sync(model)

    def generate(self, prompts: list[list[int]], sampling: Sampling, row_seeds: Sequence[int]) -> list[Generation]:
        Recording.calls.append(("generate", len(prompts)))
        return self.inner.generate(prompts, sampling, row_seeds)


def test_micro_batched_rollouts_draw_the_same_samples() -> None:
    model = _model()
    tok = SimpleNamespace(eos_id=1, vocab_size=64, decode=lambda ids: "")
    engine = SimpleNamespace(autocast=contextlib.nullcontext(), device=torch.device("cpu"))
    gen = Recording(None, tok)
    Recording.calls.clear()
    prompts, items = [[5, 6, 7], [9, 10], [11, 12, 13, 14]], [{}, {}, {}]
    args = {"tokenizer": tok, "seq_len": 32, "seed": 7, "positions": [0, 1, 2], "n_samples": 2}
    sampling = SamplingSettings(max_new_tokens=6)
    whole = sample_rollout(engine, gen, model, prompts, items, sampling, **args)
    parts = sample_rollout(engine, gen, model, prompts, items, sampling, micro_batch=4, **args)
    assert whole.replies == parts.replies and torch.equal(whole.tokens, parts.tokens)
    assert torch.allclose(whole.gen_logp, parts.gen_logp, atol=1e-5)  # padding to other widths moves the last bits
    assert [c[1] if c[0] == "generate" else c[0] for c in Recording.calls] == ["sync", 6, "sync", 4, 2]
    logp = model_token_logps(model, whole.tokens, whole.targets, 16).logp  # the training side agrees
    assert torch.allclose(logp, whole.gen_logp, atol=1e-5) and bool((whole.gen_logp[whole.mask] != 0).all())


def _grpo(start: dict[str, Path], name: str, *overrides: str) -> tuple[list[dict], Path]:
    run_dir = start["root"] / name
    cfg = load_config("tiny", [
        "algorithm=grpo", f"align.init_from={start['pt']}", f"align.data={start['prompts']}",
        f"align.tokenizer={start['tokenizer']}", f"train.run_dir={run_dir}", "train.steps=2", "train.save_every=100",
        "optim.warmup_steps=0", "optim.lr=1e-3", "optim.min_lr=1e-3", "grpo.sampling.max_new_tokens=4",
        "grpo.n_samples=2", "train.micro_batch_size=4", f"grpo.reward={VERIFIER}", *overrides,
    ])
    train(cfg)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], run_dir


def test_packing_and_rollout_micro_batches_change_nothing_but_the_cost(start: dict[str, Path]) -> None:
    plain, _ = _grpo(start, "plain")
    Recording.calls.clear()
    packed, _ = _grpo(start, "packed", "grpo.pack=true", "grpo.rollout_micro_batch=3",
                      "grpo.generator=tests.test_rl_structure:Recording")
    for a, b in zip(plain, packed, strict=True):
        for key in ("reward", "loss", "grad_norm", "entropy", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert [c[1] for c in Recording.calls if c[0] == "generate"] == [3, 3, 2] * 2  # 8 rows, 3 at a time


def test_mini_batches_and_epochs_take_that_many_optimizer_steps(
    start: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from haina.core.engine import Engine

    steps: list[int] = []
    original = Engine.optimizer_step

    def counting(self: Engine, max_norm: float | None = None) -> float:
        steps.append(1)
        return original(self, max_norm)

    monkeypatch.setattr(Engine, "optimizer_step", counting)
    (one,) = _grpo(start, "mini", "grpo.mini_batches=2", "grpo.epochs=2", "train.steps=1")[0]
    assert len(steps) == 4  # two passes over the rollout, two mini-batches each
    assert one["approx_kl"] > 0  # later mini-batches compare with the rollout policy, which has moved


def test_structure_settings_a_step_cannot_honour_are_refused(start: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"^grpo\.mini_batches: 9 mini-batches, but a rank may hold only 8 rollout rows"):
        _grpo(start, "refused", "grpo.mini_batches=9")
    with pytest.raises(ConfigError, match=r"^grpo\.generator: cannot import 'no_such_module_x'"):
        _grpo(start, "refused2", "grpo.generator=no_such_module_x:Engine")
