"""The ``rloo`` algorithm: REINFORCE Leave-One-Out (Ahmadian et al. 2024, after Kool et al. 2019).

No critic: k responses per prompt; each one's reward is the score minus beta times its KL to the reference
(log pi_old - log pi_ref summed over the response: the KL is in the reward, per sequence), and its baseline
is the mean reward of the prompt's other k - 1 responses. The advantage multiplies the response's whole
log-probability (token log-probs summed, then the mean over responses), with PPO's ratio clipping per token
so that ``epochs`` > 1 may reuse a rollout.
"""

from __future__ import annotations

import torch
from pydantic import Field

from haina.core.registry import register
from haina.plugins.align.advantages import LossAggregation, leave_one_out_advantages, sequence_kl
from haina.plugins.align.policy_gradient import CriticFreeAlgorithm, CriticFreeSettings, RolloutScores


class RLOOSettings(CriticFreeSettings):
    """RLOO."""

    n_samples: int = Field(4, ge=2, description="Responses per prompt, k (the paper compares 2 and 4).")
    beta: float = Field(0.05, ge=0, description="Coefficient of the sequence KL subtracted from the reward (0: no reference).")
    loss_agg: LossAggregation = Field(
        "seq_mean_token_sum", description="Per-token losses: each response's sum, then the mean (sequence-level REINFORCE)."
    )


@register("algorithm", "rloo", settings=RLOOSettings)
class RLOO(CriticFreeAlgorithm):
    name = "rloo"
    min_samples = 2

    def kl_in_reward(self) -> bool:
        return self.settings.beta > 0

    def advantages(self, scored: RolloutScores) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = scored.scores
        if scored.ref_logp is not None and scored.old_logp is not None:
            rewards = rewards - self.settings.beta * sequence_kl(scored.old_logp, scored.ref_logp, scored.roll.mask)
        return leave_one_out_advantages(rewards, self.settings.n_samples), {"reward_with_kl": float(rewards.mean())}
