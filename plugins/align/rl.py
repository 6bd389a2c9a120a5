"""PPO's pieces on [batch, T] tensors with a mask of the positions that generated response tokens.

Each is a small function so tests can check it against a hand computation; ``haina.plugins.algorithms.ppo`` wires
them into rollouts and updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from haina.core import collectives


def masked_mean(x: torch.Tensor, mask: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """Mean over the masked entries; ``tokens`` divides instead of this rank's own count (see
    :func:`tokens_per_rank`), so that a loss means the same on every data-parallel layout."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / (mask.sum().clamp(min=1) if tokens is None else max(tokens, 1e-9))


def tokens_per_rank(mask: torch.Tensor) -> float:
    """The world's masked-token count divided by the world size: a per-rank token mean divided by it and
    averaged over data-parallel ranks (as gradients are) is the mean over all tokens of the global batch,
    whatever the split; one rank's own count would weight its tokens by how few it drew. Tensor-parallel
    copies count alike in numerator and denominator."""
    total = collectives.reduce_values([float(mask.sum())])
    return float(total[0]) / collectives.world_size()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (advantage normalisation); 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, right to left: (advantages, returns = advantages + values).

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, where everything past the
    end of a response (mask 0) is 0, so the last response token bootstraps from nothing.
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def kl_penalty_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward -kl_coef (log pi - log ref), plus the sequence's score on its last response token."""
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * (logp - ref_logp), 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last[has]] += score[has].to(rewards.dtype)
    return rewards


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.1,
    tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, share of tokens where clipping bit, mean approximate KL to the old policy);
    ``tokens``: the loss's denominator (:func:`tokens_per_rank`), else this rank's count."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, tokens)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
    tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped within clip of the rollout's value; (loss, clip share)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask, tokens)
    return loss, masked_mean((clipped > plain).float(), mask).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass(frozen=True)
class KLSchedule:
    """KL coefficient from ``start`` at step 0 to ``end`` at ``steps`` (the report: 0.2 -> 0.005)."""

    start: float = 0.2
    end: float = 0.005
    steps: int = 350
    shape: str = "linear"

    def __post_init__(self) -> None:
        if self.shape not in ("linear", "cosine", "exponential"):
            raise ValueError(f"KL schedule shape {self.shape!r}: use linear, cosine or exponential")
        if self.shape == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError("an exponential KL schedule needs positive start and end")

    def __call__(self, step: int) -> float:
        f = min(max(step / max(self.steps - 1, 1), 0.0), 1.0)
        if self.shape == "linear":
            return self.start + (self.end - self.start) * f
        if self.shape == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * f))
        return self.start * (self.end / self.start) ** f


@dataclass(frozen=True)
class CriticWarmup:
    """The report's critic warm-up: the actor trains only from step ``steps`` on (0-based steps)."""

    steps: int = 20

    def actor_trains(self, step: int) -> bool:
        return step >= self.steps
