"""The ``model`` reward: a learned reward model (``haina rm``), frozen, scoring each row at its last token."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import nn

from haina.core.config import ConfigError, PluginSettings, plugin_settings
from haina.core.model import META
from haina.core.registry import register
from haina.plugins.algorithms.reward_model import build_value_model, last_token_scores
from haina.plugins.rewards.base import Reward, RewardInput

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine


class ModelRewardSettings(PluginSettings):
    """A frozen reward model."""

    path: str | None = Field(
        None, description="Reward-model run or checkpoint (haina rm); default: the algorithm's reward_model."
    )


@register("reward", "model", settings=ModelRewardSettings)
class ModelReward(Reward):
    """The value head's output at the last token of prompt + response, as in reward-model training.

    The reward model has the policy's shape (``model`` with the value head), as PPO's has always had.
    """

    def __init__(self, settings: ModelRewardSettings, cfg: HainaConfig) -> None:
        super().__init__(settings, cfg)
        own = plugin_settings(cfg, "algorithm", cfg.algorithm)
        self.path = settings.path or getattr(own, "reward_model", None)
        self.model: nn.Module | None = None

    def check(self) -> None:
        if self.path is None:
            raise ConfigError(f"path: a model reward needs the reward model's run (or {self.cfg.algorithm}.reward_model)")

    def setup(self, engine: Engine) -> None:
        self.model = engine.prepare_frozen(build_value_model(self.cfg, META), self.path)

    @torch.no_grad()
    def score(self, batch: RewardInput) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("ModelReward.score before setup()")
        return last_token_scores(self.model, batch.tokens, batch.last)
