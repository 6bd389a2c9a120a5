"""The ``grpo`` algorithm: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath).

No critic: each prompt gets a group of G sampled responses, and a response's advantage, shared by all its
tokens, is its reward standardised within the group, (r_i - mean(r)) / std(r). The KL to the frozen
reference is a term of the loss, the k3 estimator with coefficient beta, not a penalty in the reward; the
clipped objective is averaged over each response's tokens, then over the responses. The defaults are the
paper's (beta 0.04, one update per rollout) but for the group size (64 there).
"""

from __future__ import annotations

import torch
from pydantic import Field

from haina.core.registry import register
from haina.plugins.align.advantages import LossAggregation, group_normalized_advantages, k3_kl
from haina.plugins.align.policy_gradient import CriticFreeAlgorithm, CriticFreeSettings, RolloutScores


class GRPOSettings(CriticFreeSettings):
    """GRPO (the paper's defaults except the group size)."""

    n_samples: int = Field(8, ge=2, description="Responses per prompt, the group G (the paper: 64).")
    beta: float = Field(0.04, ge=0, description="Coefficient of the k3 KL to the reference in the loss (0: no reference).")
    loss_agg: LossAggregation = Field(
        "seq_mean_token_mean", description="Per-token losses: each response's mean, then the mean (the paper)."
    )
    std_normalize: bool = Field(True, description="Divide by the group's std (the paper); false: mean baseline only.")


@register("algorithm", "grpo", settings=GRPOSettings)
class GRPO(CriticFreeAlgorithm):
    name = "grpo"
    min_samples = 2

    def advantages(self, scored: RolloutScores) -> tuple[torch.Tensor, dict[str, float]]:
        n = self.settings.n_samples
        groups = scored.scores.view(-1, n)
        flat = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean()
        adv = group_normalized_advantages(scored.scores, n, std_normalize=self.settings.std_normalize)
        return adv, {"flat_groups": float(flat)}  # groups whose rewards all agree teach nothing

    def loss_kl(self, logp: torch.Tensor, ref_logp: torch.Tensor | None) -> torch.Tensor | None:
        return None if ref_logp is None else k3_kl(logp, ref_logp)
