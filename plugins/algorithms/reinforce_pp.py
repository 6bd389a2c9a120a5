"""The ``reinforce_pp`` algorithm: REINFORCE++ (Hu 2025).

No critic and no per-prompt baseline: every response token gets the reward -beta (log pi_old - log pi_ref)
(the KL to the reference, per token, in the reward) and the last one the score besides; a token's
advantage is its return to go (discount ``gamma``, 1 in the paper), normalised over the whole batch (all
response tokens of all ranks); the update is PPO's clipped surrogate, averaged over tokens. Prompts may
still be sampled more than once (``n_samples``), but nothing is computed per group.
"""

from __future__ import annotations

import torch
from pydantic import Field

from haina.core.registry import register
from haina.plugins.align.advantages import LossAggregation, global_masked_whiten, returns_to_go
from haina.plugins.align.policy_gradient import CriticFreeAlgorithm, CriticFreeSettings, RolloutScores
from haina.plugins.align.rl import kl_penalty_rewards


class ReinforcePPSettings(CriticFreeSettings):
    """REINFORCE++."""

    n_samples: int = Field(1, gt=0, description="Responses per prompt (the method needs no group).")
    beta: float = Field(0.01, ge=0, description="Coefficient of the per-token KL penalty in the reward (0: no reference).")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount of the return to go.")
    loss_agg: LossAggregation = Field("token_mean", description="Per-token losses: the mean over all response tokens.")


@register("algorithm", "reinforce_pp", settings=ReinforcePPSettings)
class ReinforcePP(CriticFreeAlgorithm):
    name = "reinforce_pp"

    def kl_in_reward(self) -> bool:
        return self.settings.beta > 0

    def advantages(self, scored: RolloutScores) -> tuple[torch.Tensor, dict[str, float]]:
        mask = scored.roll.mask
        old = scored.old_logp if scored.old_logp is not None else torch.zeros(mask.shape, device=mask.device)
        ref = scored.ref_logp if scored.ref_logp is not None else old
        rewards = kl_penalty_rewards(old, ref, scored.scores, mask, self.settings.beta)
        returns = returns_to_go(rewards, mask, self.settings.gamma)
        first = mask.float().argmax(dim=1)  # each response's first position: its whole return
        return global_masked_whiten(returns, mask), {"return": float(returns.gather(1, first[:, None]).mean())}
