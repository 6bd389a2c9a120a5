"""The ``weighted`` reward: a weighted sum of other rewards, e.g. Baichuan 2's helpfulness + harmlessness.

Every algorithm's ``reward`` list is one of these; naming it as a term (``{type: weighted, name: hh,
terms: [...]}``) nests a sum inside another and logs it under its own name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from haina.core.config import ConfigError, PluginSettings
from haina.core.registry import register
from haina.plugins.rewards.base import Reward, RewardInput, RewardSpec, build_term

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine


class WeightedSettings(PluginSettings):
    """A weighted sum of reward terms."""

    terms: RewardSpec = Field(
        default_factory=list, description="Reward terms {type, name, weight, <settings>}, summed with their weights."
    )


@register("reward", "weighted", settings=WeightedSettings)
class WeightedReward(Reward):
    """sum_i weight_i * score_i; :meth:`score_terms` also returns each term's own (unweighted) score."""

    def __init__(self, settings: WeightedSettings, cfg: HainaConfig) -> None:
        super().__init__(settings, cfg)
        self.terms: list[tuple[str, float, Reward]] = [
            (t["name"], t["weight"], build_term(t, cfg)) for t in settings.terms
        ]

    def check(self) -> None:
        self.check_at("terms")

    def check_at(self, where: str) -> None:
        """Every term's check; a refusal names the term: ``grpo.reward.1.function: cannot import ...``."""
        if not self.terms:
            raise ConfigError(f"{where}: a weighted reward needs at least one term")
        for i, (_, _, term) in enumerate(self.terms):
            if isinstance(term, WeightedReward):
                term.check_at(f"{where}.{i}.terms")
                continue
            try:
                term.check()
            except ConfigError as exc:
                raise ConfigError(f"{where}.{i}.{str(exc).splitlines()[0]}") from None

    def setup(self, engine: Engine) -> None:
        for _, _, term in self.terms:
            term.setup(engine)

    def score_terms(self, batch: RewardInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total [b], {term name: its score [b]})."""
        device = batch.tokens.device
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(batch), dtype=torch.float32, device=device)
        for name, weight, term in self.terms:
            score = term.score(batch).to(device=device, dtype=torch.float32)
            if score.shape != total.shape:
                raise ValueError(f"reward term {name!r} returned shape {tuple(score.shape)} for {len(batch)} rows")
            parts[name] = score
            total = total + weight * score
        return total, parts

    def score(self, batch: RewardInput) -> torch.Tensor:
        return self.score_terms(batch)[0]

    def names(self) -> list[str]:
        return [name for name, _, _ in self.terms]



def build_reward(spec: list[dict[str, Any]], cfg: HainaConfig, where: str) -> WeightedReward:
    """The weighted sum of an algorithm's reward terms, each checked; a failing check is a one-line
    ConfigError at ``where.<term>.<setting>``."""
    reward = WeightedReward(WeightedSettings(terms=spec), cfg)
    reward.check_at(where)
    return reward
