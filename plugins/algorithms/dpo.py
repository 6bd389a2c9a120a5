"""The ``dpo`` algorithm: direct preference optimisation against a frozen reference model.

Loss -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]) over response
tokens only; the implicit rewards beta * (log pi - log ref) of both sides, their margin and the share
of pairs ranked right are logged. The policy starts from ``align.init_from`` and the reference is a
frozen copy of ``dpo.reference`` (default: the same checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import nn

from haina.core.algorithm import Algorithm
from haina.core.config import PluginSettings
from haina.core.loss import LossOutput
from haina.core.model import META, build_model
from haina.core.registry import register
from haina.core.tokenizer import load_tokenizer
from haina.plugins.align.common import config_check, shifted_targets, token_logps
from haina.plugins.align.preference_data import PairBatches, read_pairs
from haina.plugins.align.preference_losses import dpo_loss

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.engine import Engine


def response_logps(model: nn.Module, tokens: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each row's response tokens: [b]."""
    logits = model(tokens, logits=slice(None))
    return token_logps(logits, shifted_targets(tokens, response)).sum(-1)


class DPOSettings(PluginSettings):
    """Direct preference optimisation."""

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint.")
    reference: str | None = Field(None, description="Frozen reference checkpoint; default: align.init_from.")


@register("algorithm", "dpo", settings=DPOSettings, legacy={"align.beta": "beta", "align.reference": "reference"})
class DPO(Algorithm):
    check_config = config_check("dpo", needs=("align.init_from",))
    metrics = ("chosen_reward", "rejected_reward", "reward_margin", "accuracy")

    def __init__(self, cfg: HainaConfig) -> None:
        super().__init__(cfg)
        self.reference: nn.Module | None = None

    def setup(self, engine: Engine, resumed: bool) -> None:
        # DCP only when a run starts: listing or validating plugins must not load the checkpoint machinery
        from haina.core.checkpoint import load_model_weights

        init_from = self.cfg.align.init_from
        if not resumed:
            load_model_weights(init_from, engine.parts[0])
        self.reference = engine.prepare_frozen(build_model(self.cfg, META), self.settings.reference or init_from)

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> PairBatches:
        return PairBatches(
            read_pairs(cfg.align.data), load_tokenizer(cfg), cfg.train.seq_len, cfg.train.micro_batch_size,
            cfg.train.seed,
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        device = next(model.parameters()).device
        tokens, response = batch["tokens"].to(device), batch["response"].to(device)
        policy = response_logps(model, tokens, response)
        with torch.no_grad():
            reference = response_logps(self.reference, tokens, response)
        m = tokens.shape[0] // 2
        out = dpo_loss(policy[:m], policy[m:], reference[:m], reference[m:], self.settings.beta)
        parts = {
            "chosen_reward": out.chosen_rewards.detach().mean(),
            "rejected_reward": out.rejected_rewards.detach().mean(),
            "reward_margin": out.margins.detach().mean(),
            "accuracy": torch.as_tensor(out.accuracy, dtype=torch.float32),
        }
        return LossOutput(out.loss, parts)
