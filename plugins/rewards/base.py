"""The reward contract, and the ``reward`` setting through which an RL algorithm names its rewards.

A reward plugin is a :class:`Reward` subclass registered under kind ``reward`` with its own settings:
``@register("reward", "verifier", settings=VerifierSettings)``. The algorithm builds it as
``Reward(settings, cfg)``, calls :meth:`Reward.check` before any process starts, :meth:`Reward.setup`
once the engine exists (a reward model becomes a frozen model in the run's layout), and
:meth:`Reward.score` on every rollout batch. Built-ins: ``model`` (a learned reward model), ``verifier``
(``module:function``), the rules ``length``, ``format`` and ``refusal``, and ``weighted`` (a weighted sum,
which :func:`haina.plugins.rewards.combine.build_reward` makes of every algorithm's list).

In a config an algorithm's ``reward`` is one term or a list of terms, each a mapping with ``type`` (the
reward plugin), optional ``name`` (the ``reward/<name>`` metric), optional ``weight`` (default 1) and the
plugin's own settings beside them; a list is a weighted sum::

    grpo:
      reward:
        - {type: verifier, function: mypkg.checks:exact_answer}
        - {type: format, pattern: '(?s)<think>.+</think>.+', weight: 0.1}
    ppo:
      reward:                       # Baichuan 2's helpfulness + harmlessness
        - {type: model, name: helpful, path: runs/rm-helpful}
        - {type: model, name: harmless, path: runs/rm-harmless}

A bare plugin name (``grpo.reward=verifier``) is one term with that plugin's defaults. The terms are
validated with the rest of the config and written to the run's config.yaml with every default filled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import BeforeValidator, ValidationError

from haina.core import collectives, registry
from haina.core.config import PluginSettings
from haina.core.errors import PluginError
from haina.core.validation import SectionError, allowed_keys_of, first_error

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine

__all__ = ["TERM_KEYS", "Reward", "RewardInput", "RewardSpec", "build_term", "parse_reward_spec", "sync_over_tp"]

TERM_KEYS = ("type", "name", "weight")  # a term's own keys; every other key is a setting of its plugin


@dataclass(frozen=True)
class RewardInput:
    """What a reward sees of one rollout batch of ``b`` rows (one row per sampled response)."""

    prompts: list[str]  # the last user turn of each row's prompt
    responses: list[str]  # the decoded response, without the eos that closed it
    items: list[dict[str, Any]]  # each row's prompt record: its other fields (answer, category, ...)
    tokens: torch.Tensor  # [b, s] prompt + response ids, right-padded with 0
    last: torch.Tensor  # [b] index of each row's last token in ``tokens``
    response_lengths: list[int]  # response tokens, the closing eos included
    finished: list[bool]  # whether the response ended with eos (not cut at max_new_tokens / seq_len)

    def __len__(self) -> int:
        return len(self.responses)


class Reward:
    """Base of reward plugins: :meth:`score` turns a rollout batch into one number per row."""

    def __init__(self, settings: Any, cfg: HainaConfig) -> None:
        self.settings = settings
        self.cfg = cfg

    def check(self) -> None:  # noqa: B027 (an optional hook)
        """Refuse what cannot work (a function that does not import, a missing checkpoint) before any
        process group starts: raise ConfigError("<setting>: what is wrong"); the algorithm puts the
        term's place in front (``grpo.reward.0.function: ...``)."""

    def setup(self, engine: Engine) -> None:  # noqa: B027 (an optional hook)
        """Build what scoring needs once the engine exists (a frozen reward model in the run's layout)."""

    def score(self, batch: RewardInput) -> torch.Tensor:
        """[b] fp32 scores on ``batch.tokens.device``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------ config shape

def _term_names(kind: str) -> str:
    return ", ".join(registry.names(kind)) or "(none)"


def _allowed_in_term(settings: type) -> Any:
    """Keys allowed where an unknown one stands: a term's own keys beside its plugin's settings."""
    nested = allowed_keys_of(settings)
    return lambda loc: sorted({*nested(loc), *TERM_KEYS}) if len(loc) == 1 else nested(loc)


def parse_reward_spec(value: Any) -> list[dict[str, Any]]:
    """A ``reward`` setting as a list of complete terms ``{type, name, weight, <settings>}``.

    Raises :class:`SectionError` at the offending term and key, so the config error reads
    ``grpo.reward.1.function: Field required``.
    """
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("a reward is a reward plugin's name, a mapping {type: <plugin>, ...} or a non-empty list of them")
    terms: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, raw in enumerate(value):
        if isinstance(raw, str):
            raw = {"type": raw}
        if not isinstance(raw, dict):
            raise SectionError((i,), f"a reward term is a mapping with type: <reward plugin> ({_term_names('reward')})")
        raw = dict(raw)
        kind = raw.pop("type", None)
        if not isinstance(kind, str):
            raise SectionError((i, "type"), f"missing; reward plugins: {_term_names('reward')}")
        try:
            entry = registry.entry("reward", kind)
        except PluginError as exc:
            raise SectionError((i, "type"), str(exc)) from None
        name = raw.pop("name", None)
        if name is None:
            name = kind if kind not in names else f"{kind}_{i}"
        if not isinstance(name, str) or not name or name in names:
            raise SectionError((i, "name"), f"a term's name is a non-empty string, unique in its list (got {name!r})")
        names.add(name)
        weight = raw.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise SectionError((i, "weight"), f"a number (got {weight!r})")
        settings: dict[str, Any] = {}
        if entry.settings is not None:
            try:
                settings = entry.settings.model_validate(raw).model_dump(mode="json")
            except ValidationError as exc:
                loc, message = first_error(exc, _allowed_in_term(entry.settings), unknown="unknown setting")
                raise SectionError((i, *loc), message) from None
        elif raw:
            raise SectionError((i, next(iter(raw))), f"the {kind} reward has no settings")
        terms.append({"type": kind, "name": name, "weight": float(weight), **settings})
    return terms


def _validated(value: Any) -> Any:
    return [] if value is None or value == [] else parse_reward_spec(value)


# the type of an algorithm's ``reward`` setting: written as one term or a list, stored as complete terms;
# empty (the default) means the algorithm's default reward, or none
RewardSpec = Annotated[list[dict[str, Any]], BeforeValidator(_validated)]


def build_term(term: dict[str, Any], cfg: HainaConfig) -> Reward:
    """The reward plugin of one complete term (see :func:`parse_reward_spec`)."""
    entry = registry.entry("reward", term["type"])
    own = {k: v for k, v in term.items() if k not in TERM_KEYS}
    settings: PluginSettings | None = entry.settings.model_validate(own) if entry.settings is not None else None
    reward = entry.obj(settings, cfg)
    if not isinstance(reward, Reward):
        raise PluginError(f"reward plugin {term['type']!r} built a {type(reward).__name__}, not a haina Reward")
    return reward


def sync_over_tp(values: torch.Tensor, engine: Engine) -> torch.Tensor:
    """The first tensor-parallel rank's ``values`` on every rank of its tp group.

    The ranks of a tp group score the same rows; a verifier that is not deterministic (a judge that
    samples, a timeout) must not let them disagree, or their updates would diverge."""
    if engine.layout.tp == 1:
        return values
    tp = engine.mesh["tp"]
    mine = values if tp.get_local_rank() == 0 else torch.zeros_like(values)
    return collectives.all_reduce(mine.contiguous(), group=tp.get_group())

