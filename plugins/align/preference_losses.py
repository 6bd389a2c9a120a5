"""Losses on preference pairs: the reward model's pairwise ranking loss and DPO, plus bucketed accuracy."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """mean(-log sigmoid(r_chosen - r_rejected - margin)); a margin asks clearer pairs to be ranked apart
    by more (Llama 2's use of the annotators' score gap)."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()


def accuracy_by_bucket(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, keys: Sequence[Hashable]
) -> dict[Hashable, tuple[float, int]]:
    """{key: (share of pairs with r_chosen > r_rejected, pairs)} for keys such as score gap or category."""
    if len(keys) != r_chosen.numel():
        raise ValueError(f"{len(keys)} keys for {r_chosen.numel()} pairs")
    right = (r_chosen > r_rejected).tolist()
    counts: dict[Hashable, list[int]] = {}
    for key, ok in zip(keys, right, strict=True):
        tally = counts.setdefault(key, [0, 0])
        tally[0] += int(ok)
        tally[1] += 1
    return {key: (hits / n, n) for key, (hits, n) in counts.items()}


@dataclass
class DPOOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi - log ref) of the chosen responses
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: float


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """-log sigmoid(beta [(pi_w - ref_w) - (pi_l - ref_l)]) from sequence log-probabilities [pairs]."""
    chosen = beta * (policy_chosen.float() - ref_chosen.float())
    rejected = beta * (policy_rejected.float() - ref_rejected.float())
    margins = chosen - rejected
    return DPOOutput(
        loss=-F.logsigmoid(margins).mean(),
        chosen_rewards=chosen.detach(),
        rejected_rewards=rejected.detach(),
        margins=margins.detach(),
        accuracy=float((margins > 0).float().mean()),
    )
