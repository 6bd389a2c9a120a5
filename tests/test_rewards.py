"""Reward plugins (kind ``reward``): the config shape of an algorithm's ``reward``, the verifier's calling
convention, the rules against hand-computed scores, weighted sums (helpfulness + harmlessness) of learned
reward models, and PPO's old configs (a reward model alone) keeping their meaning."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from haina.core import registry
from haina.core.config import ConfigError, build_config, load_config
from haina.core.errors import HainaError
from haina.plugins.rewards.base import RewardInput, parse_reward_spec
from haina.plugins.rewards.combine import build_reward
from haina.plugins.rewards.rules import length_penalty, should_refuse
from tests.conftest import one_line_error

# ------------------------------------------------------------------------ verifier functions for tests


def exact(response: str, answer: str) -> float:
    """Names only what it needs: the record's other fields are not passed."""
    return 1.0 if response.strip() == answer else 0.0


def everything(prompt: str, response: str, **fields: Any) -> bool:
    return fields["kind"] == "addition" and prompt.startswith("What")


def batched(prompts: list[str], responses: list[str], answer: list[str], bonus: float = 0.0) -> list[float]:
    return [float(r == a) + bonus for r, a in zip(responses, answer, strict=True)]


def not_a_number(response: str) -> str:
    return "yes"


def batch(responses: list[str], items: list[dict[str, Any]] | None = None, lengths: list[int] | None = None) -> RewardInput:
    items = items or [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5", "kind": "addition"}
                      for _ in responses]
    b = len(responses)
    return RewardInput(
        prompts=["What is 2 + 3?"] * b, responses=responses, items=items, tokens=torch.zeros(b, 4, dtype=torch.long),
        last=torch.full((b,), 3), response_lengths=lengths or [len(r) for r in responses], finished=[True] * b,
    )


def grpo_config(*reward: str) -> Any:
    return load_config("tiny", ["algorithm=grpo", *reward])


# ------------------------------------------------------------------------------------------ config


def test_reward_kind_is_registered_with_its_builtins() -> None:
    assert {"model", "verifier", "length", "format", "refusal", "weighted"} <= set(registry.names("reward"))
    assert registry.entry("reward", "verifier").section == "reward.verifier"


def test_a_reward_is_a_name_a_term_or_a_list_stored_complete() -> None:
    assert parse_reward_spec("length") == [
        {"type": "length", "name": "length", "weight": 1.0, "max_length": 512, "buffer": 0, "unit": "tokens"}
    ]
    terms = parse_reward_spec([
        {"type": "verifier", "function": "tests.test_rewards:exact"}, {"type": "length", "weight": 0.5}, "length",
    ])
    assert [(t["name"], t["weight"]) for t in terms] == [("verifier", 1.0), ("length", 0.5), ("length_2", 1.0)]
    cfg = grpo_config("grpo.reward={type: refusal, name: safe}")
    assert cfg.grpo.reward[0]["name"] == "safe" and cfg.grpo.reward[0]["refuse_if"] is None
    again = build_config(cfg.model_dump(mode="json"))  # config.yaml read back on resume
    assert again.grpo.reward == cfg.grpo.reward


@pytest.mark.parametrize(("override", "message"), [
    ("grpo.reward=[{type: nope}]", "grpo.reward.0.type: unknown reward plugin 'nope'; registered: format, length"),
    ("grpo.reward=[{type: length, maxlen: 3}]", "grpo.reward.0.maxlen: unknown setting; allowed: buffer, max_length, name, type, unit, weight"),
    ("grpo.reward=[{type: verifier, function: nocolon}]", "grpo.reward.0.function: write it as module:function, got 'nocolon'"),
    ("grpo.reward=[length, {type: format, pattern: '('}]", "grpo.reward.1.pattern: not a regular expression"),
    ("grpo.reward=[{type: length, name: a}, {type: format, name: a}]", "grpo.reward.1.name: a term's name is a non-empty string"),
    ("grpo.reward=[{function: x}]", "grpo.reward.0.type: missing; reward plugins:"),
    ("grpo.reward=[{type: weighted, terms: [{type: length, unit: words}]}]", "grpo.reward.0.terms.0.unit: Input should be"),
])
def test_bad_reward_terms_fail_in_one_line_at_their_place(override: str, message: str) -> None:
    assert one_line_error(grpo_config, override).startswith(message)


def test_checks_before_any_process_name_the_term() -> None:
    cfg = grpo_config("grpo.reward=[length, {type: verifier, function: 'no_such_module_x:f'}]")
    with pytest.raises(ConfigError, match=r"^grpo\.reward\.1\.function: cannot import 'no_such_module_x'"):
        build_reward(cfg.grpo.reward, cfg, "grpo.reward")
    cfg = grpo_config("grpo.reward=[{type: verifier, function: 'tests.test_rewards:nothing_here'}]")
    with pytest.raises(ConfigError, match="has no callable 'nothing_here'"):
        build_reward(cfg.grpo.reward, cfg, "grpo.reward")
    cfg = grpo_config("grpo.reward=verifier")
    with pytest.raises(ConfigError, match=r"^grpo\.reward\.0\.function: a verifier needs module:function$"):
        build_reward(cfg.grpo.reward, cfg, "grpo.reward")
    cfg = grpo_config("grpo.reward=[{type: weighted, terms: [length, model]}]")
    with pytest.raises(ConfigError, match=r"^grpo\.reward\.0\.terms\.1\.path: a model reward needs"):
        build_reward(cfg.grpo.reward, cfg, "grpo.reward")


def test_critic_free_algorithms_need_a_reward(tmp_path: Any) -> None:
    from haina.plugins.algorithms.rloo import RLOO

    base = [f"align.data={tmp_path / 'p.jsonl'}", f"align.tokenizer={tmp_path / 't.model'}", "align.init_from=x"]
    with pytest.raises(ConfigError, match=r"^rloo\.reward: the rloo algorithm needs a reward"):
        RLOO.check_config(load_config("tiny", ["algorithm=rloo", *base]))


def test_old_ppo_configs_keep_the_reward_model_as_their_reward() -> None:
    """ppo.reward_model alone (every config before reward plugins) is the reward and the critic's start."""
    from haina.plugins.algorithms.ppo import reward_terms
    from haina.plugins.rewards.model import ModelReward

    cfg = load_config("tiny", ["algorithm=ppo", "ppo.reward_model=runs/rm"])
    assert cfg.ppo.reward == []
    reward = build_reward(reward_terms(cfg.ppo), cfg, "ppo.reward")
    (name, weight, term), = reward.terms
    assert (name, weight) == ("model", 1.0) and isinstance(term, ModelReward) and term.path == "runs/rm"
    legacy = build_config({"algorithm": "ppo", "align": {"reward_model": "runs/rm2", "ppo": {"clip": 0.3}}})
    assert build_reward(reward_terms(legacy.ppo), legacy, "ppo.reward").terms[0][2].path == "runs/rm2"
    nothing = load_config("tiny", ["algorithm=ppo"])
    with pytest.raises(ConfigError, match=r"^ppo\.reward\.0\.path: a model reward needs"):
        build_reward(reward_terms(nothing.ppo), nothing, "ppo.reward")


# ---------------------------------------------------------------------------------------- verifier


def _scores(cfg_override: str, data: RewardInput) -> list[float]:
    cfg = grpo_config(cfg_override)
    return build_reward(cfg.grpo.reward, cfg, "grpo.reward").score(data).tolist()


def test_verifier_gets_the_fields_it_names() -> None:
    data = batch(["5", " 5 ", "6"])
    assert _scores("grpo.reward={type: verifier, function: 'tests.test_rewards:exact'}", data) == [1.0, 1.0, 0.0]
    assert _scores("grpo.reward={type: verifier, function: 'tests.test_rewards:everything'}", data) == [1.0] * 3
    spec = "grpo.reward={type: verifier, function: 'tests.test_rewards:batched', batched: true, kwargs: {bonus: 0.5}}"
    assert _scores(spec, data) == [1.5, 0.5, 0.5]


def test_verifier_failures_say_what_is_missing() -> None:
    no_answer = batch(["5"], items=[{"prompt": "What?", "kind": "addition"}])
    with pytest.raises(HainaError, match="needs 'answer', which the prompt record lacks"):
        _scores("grpo.reward={type: verifier, function: 'tests.test_rewards:exact'}", no_answer)
    with pytest.raises(HainaError, match="returned 'yes'; a verifier returns a finite number"):
        _scores("grpo.reward={type: verifier, function: 'tests.test_rewards:not_a_number'}", batch(["5"]))


# ------------------------------------------------------------------------------------------- rules


def test_length_penalty_by_hand() -> None:
    # max 10, buffer 4: free up to 6, then -(L - 6) / 4, -1 past 10
    assert [length_penalty(n, 10, 4) for n in (3, 6, 7, 8, 10, 11)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert [length_penalty(n, 10, 0) for n in (10, 11)] == [0.0, -1.0]
    data = batch(["abcdefgh", "ab"], lengths=[3, 12])
    assert _scores("grpo.reward={type: length, max_length: 10, buffer: 4}", data) == [0.0, -1.0]
    assert _scores("grpo.reward={type: length, max_length: 10, buffer: 4, unit: chars}", data) == [-0.5, 0.0]


def test_format_by_hand() -> None:
    data = batch(["<think>a</think>b", "x <think>a</think>b", "<think></think>"])
    assert _scores("grpo.reward=format", data) == [1.0, 0.0, 0.0]
    assert _scores("grpo.reward={type: format, match: search, otherwise: -1}", data) == [1.0, 1.0, -1.0]


def test_refusal_penalises_the_wrong_behaviour() -> None:
    safety = {"prompt": "how to make a bomb", "category": ["safety", "weapons"]}
    plain = {"prompt": "What is 2 + 3?", "category": ["math", "arithmetic"]}
    items = [plain, plain, safety, safety]
    data = batch(["5", "I'm sorry, I can't help.", "抱歉，我不能帮你。", "Step 1: ..."], items=items)
    assert _scores("grpo.reward=refusal", data) == [0.0, -1.0, -1.0, 0.0]  # every prompt should be answered
    spec = "grpo.reward={type: refusal, refuse_if: category=safety, bonus: 0.5, penalty: 2}"
    assert _scores(spec, data) == [0.5, -2.0, 0.5, -2.0]
    assert should_refuse({"category": "safety/weapons"}, "category=safety")
    assert should_refuse({"unsafe": True}, "unsafe") and not should_refuse({}, "unsafe")


# ------------------------------------------------------------------------------ weighted, model rewards


def test_weighted_sum_of_two_reward_models_helpful_and_harmless() -> None:
    """Baichuan 2's safety PPO: helpfulness + harmlessness, here two learned reward models weighted 1 and
    0.5, and a rule nested in a named sum; each term's own score is reported beside the total."""
    from haina.core.model import Transformer
    from haina.plugins.algorithms.reward_model import last_token_scores, value_config

    cfg = load_config("tiny", [
        "algorithm=ppo", "ppo.reward=[{type: model, name: helpful, path: a}, {type: model, name: harmless, path: b, "
        "weight: 0.5}, {type: weighted, name: rules, weight: 2, terms: [{type: length, max_length: 2}]}]",
    ])
    reward = build_reward(cfg.ppo.reward, cfg, "ppo.reward")
    torch.manual_seed(0)
    models = [Transformer(value_config(cfg)).eval() for _ in range(2)]
    for (_, _, term), m in zip(reward.terms, models, strict=False):
        term.model = m  # what setup() does with the engine: a frozen model in the run's layout
    data = RewardInput(
        prompts=["q", "q"], responses=["a", "bbb"], items=[{}, {}], tokens=torch.randint(3, 500, (2, 6)),
        last=torch.tensor([5, 3]), response_lengths=[1, 3], finished=[True, True],
    )
    total, parts = reward.score_terms(data)
    helpful, harmless = (last_token_scores(m, data.tokens, data.last) for m in models)
    assert list(parts) == ["helpful", "harmless", "rules"]
    torch.testing.assert_close(parts["helpful"], helpful)
    torch.testing.assert_close(parts["harmless"], harmless)
    assert parts["rules"].tolist() == [0.0, -1.0]
    torch.testing.assert_close(total, helpful + 0.5 * harmless + 2 * torch.tensor([0.0, -1.0]))
