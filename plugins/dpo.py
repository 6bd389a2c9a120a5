"""The ``dpo`` algorithm: direct preference optimisation against a frozen reference model.

Loss -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]) over response
tokens only; the implicit rewards beta * (log pi - log ref) of both sides, their margin and the share
of pairs ranked right are logged. The policy starts from ``align.init_from`` and the reference is a
frozen copy of ``align.reference`` (default: the same checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from haina.plugins.alignment import config_check, load_tokenizer, shifted_targets, token_logps
from haina.plugins.preference_data import PairBatches, read_pairs
from haina.plugins.registry import register

if TYPE_CHECKING:
    from haina.core.config import HainaConfig
    from haina.core.train import Engine
    from haina.plugins.loss import LossOutput


def response_logps(model: nn.Module, tokens: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each row's response tokens: [b]."""
    logits = model(tokens, logits=slice(None))
    return token_logps(logits, shifted_targets(tokens, response)).sum(-1)


@register("algorithm", "dpo")
class DPO:
    check_config = config_check("dpo", needs=("init_from",))
    metrics = ("chosen_reward", "rejected_reward", "reward_margin", "accuracy")

    def __init__(self, cfg: HainaConfig) -> None:
        self.cfg = cfg
        self.reference: nn.Module | None = None

    def setup(self, engine: Engine, resumed: bool) -> None:
        from haina.core.checkpoint import load_model_weights
        from haina.core.train import build_model

        align = self.cfg.align
        if not resumed:
            load_model_weights(align.init_from, engine.parts[0])
        self.reference = engine.prepare_frozen(build_model(self.cfg, engine.device), align.reference or align.init_from)

    def batches(self, cfg: HainaConfig, run_dir: Path, num_samples: int) -> PairBatches:
        return PairBatches(
            read_pairs(cfg.align.data), load_tokenizer(cfg), cfg.train.seq_len, cfg.train.micro_batch_size,
            cfg.train.seed,
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        from haina.plugins.loss import LossOutput
        from haina.plugins.preference import dpo_loss

        device = next(model.parameters()).device
        tokens, response = batch["tokens"].to(device), batch["response"].to(device)
        policy = response_logps(model, tokens, response)
        with torch.no_grad():
            reference = response_logps(self.reference, tokens, response)
        m = tokens.shape[0] // 2
        out = dpo_loss(policy[:m], policy[m:], reference[:m], reference[m:], self.cfg.align.beta)
        parts = {
            "chosen_reward": out.chosen_rewards.detach().mean(),
            "rejected_reward": out.rejected_rewards.detach().mean(),
            "reward_margin": out.margins.detach().mean(),
            "accuracy": torch.as_tensor(out.accuracy, dtype=torch.float32),
        }
        return LossOutput(out.loss, parts)
