"""The built-in loss terms: next-token cross-entropy, Baichuan 2's max-z loss and PaLM's z-loss.

Each gives its per-token value from fp32 logits and, through ``from_stats``, its value and gradient from
the per-row statistics the chunked loss shares between terms (:mod:`haina.core.loss`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from haina.core.loss import LogitStats, LossTerm, RowGrad
from haina.core.registry import register


@register("loss", "cross_entropy")
class CrossEntropy(LossTerm):
    """Next-token cross-entropy: lse - logit[target]."""

    metric: ClassVar[str] = "lm_loss"

    def per_token(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def from_stats(self, stats: LogitStats) -> tuple[Tensor, RowGrad]:
        one = torch.ones_like(stats.lse)
        return stats.lse - stats.target_logit, RowGrad(softmax=one, target=-one)


@register("loss", "max_z")
class MaxZLoss(LossTerm):
    """Baichuan 2's max-z loss, (max logit)^2: keeps NormHead logits from drifting upwards."""

    metric: ClassVar[str] = "max_z_loss"

    def per_token(self, logits: Tensor, targets: Tensor) -> Tensor:
        return logits.float().max(dim=-1).values.square()

    def from_stats(self, stats: LogitStats) -> tuple[Tensor, RowGrad]:
        return stats.max.square(), RowGrad(argmax=2.0 * stats.max)


@register("loss", "z_loss")
class ZLoss(LossTerm):
    """PaLM's z-loss, logsumexp^2: pulls the softmax normalizer towards 1."""

    metric: ClassVar[str] = "z_loss"

    def per_token(self, logits: Tensor, targets: Tensor) -> Tensor:
        return torch.logsumexp(logits.float(), dim=-1).square()

    def from_stats(self, stats: LogitStats) -> tuple[Tensor, RowGrad]:
        return stats.lse.square(), RowGrad(softmax=2.0 * stats.lse)
