"""Advantages, KL estimators and the clipped policy loss of the critic-free RL algorithms, from their papers.

All on [b, T] tensors with ``mask`` marking the positions that predict response tokens; rows come in
groups of ``n`` responses to one prompt (see :mod:`haina.plugins.align.rollout`).

- GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1): outcome rewards r of a group of G responses give
  every token of response i the advantage (r_i - mean(r)) / std(r); the KL to the reference is not in
  the reward but in the loss, with the k3 estimator pi_ref/pi - log(pi_ref/pi) - 1 (unbiased, >= 0) and
  coefficient beta; the objective averages over each response's tokens, then over the responses.
- RLOO (Ahmadian et al. 2024, after Kool et al. 2019): the reward is R - beta * log(pi/pi_ref) summed over
  the response (the KL in the reward, per sequence); the baseline of sample i is the mean reward of the
  other k - 1 samples of its prompt; REINFORCE on the sequence: the advantage multiplies the sum of the
  response's token log-probabilities.
- REINFORCE++ (Hu 2025): the KL penalty -beta (log pi_old - log pi_ref) on every token and the score on
  the last one; the advantage of a token is its return to go; advantages are normalised over the whole
  batch (every token of every rank), not per prompt.

Each uses PPO's clipped ratio (:func:`clipped_policy_loss`), so several updates may reuse one rollout.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from haina.core import collectives

LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]

__all__ = [
    "LossAggregation",
    "aggregate",
    "clipped_policy_loss",
    "global_masked_whiten",
    "group_normalized_advantages",
    "k3_kl",
    "leave_one_out_advantages",
    "returns_to_go",
    "sequence_kl",
]


def _groups(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.dim() != 1 or x.shape[0] % n:
        raise ValueError(f"{tuple(x.shape)} rewards do not form groups of {n}")
    return x.float().view(-1, n)


def group_normalized_advantages(
    rewards: torch.Tensor, n: int, std_normalize: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: (r_i - mean of its group) / (std of its group + eps), per response [b].

    The std is the sample std (n - 1 in the denominator); ``eps`` keeps a group whose rewards all but
    agree from blowing up. ``std_normalize=False`` keeps only the mean baseline (Dr. GRPO's variant)."""
    if n < 2:
        raise ValueError("group-normalised advantages need at least 2 samples per prompt")
    r = _groups(rewards, n)
    centred = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def leave_one_out_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """RLOO: r_i - mean_{j != i} r_j over the other samples of the prompt, per response [b]."""
    if n < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
    r = _groups(rewards, n)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (n - 1)
    return (r - baseline).flatten()


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over the masked positions, right to left (0 off the mask) [b, T]."""
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def global_masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (population) variance over the masked entries of every
    rank of ``group`` (default: the world when one exists); 0 off the mask.

    Tensor-parallel ranks hold copies of their group's rows: counting each row tp times changes neither
    the mean nor the variance, so the world serves any layout without pipeline stages."""
    m = mask.to(torch.float64)
    xd = x.to(torch.float64)
    stats = torch.stack([(xd * m).sum(), (xd * xd * m).sum(), m.sum()])
    if dist.is_initialized():
        collectives.all_reduce(stats, group=group)
    count = stats[2].clamp(min=1)
    mean = stats[0] / count
    var = (stats[1] / count - mean * mean).clamp(min=0)
    out = (xd - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), out, 0.0).to(x.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3), GRPO's choice.

    The log-ratio is clamped to +-20 so one token the reference finds far likelier cannot overflow."""
    delta = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(delta) - delta - 1.0


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t (log pi - log ref) over each response (the k1 estimate of KL on the sequence) [b]."""
    return torch.where(mask.bool(), logp - ref_logp, 0.0).sum(dim=-1)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: LossAggregation, tokens: float | None = None
) -> torch.Tensor:
    """One loss from per-token terms [b, T]: the mean over all response tokens (``token_mean``; divided by
    ``tokens``, the world's mean count per rank, when given, so every layout weighs tokens alike), the mean
    over responses of each one's token mean (``seq_mean_token_mean``, GRPO) or token sum
    (``seq_mean_token_sum``, sequence-level REINFORCE)."""
    m = mask.to(per_token.dtype)
    summed = (torch.where(mask.bool(), per_token, 0.0)).sum(dim=-1)
    if mode == "token_mean":
        return summed.sum() / (m.sum().clamp(min=1) if tokens is None else max(tokens, 1e-9))
    if mode == "seq_mean_token_mean":
        return (summed / m.sum(dim=-1).clamp(min=1)).mean()
    if mode == "seq_mean_token_sum":
        return summed.mean()
    raise ValueError(f"loss aggregation {mode!r}: token_mean, seq_mean_token_mean or seq_mean_token_sum")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    mode: LossAggregation = "token_mean",
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token, max(-A rho, -A clip(rho, 1 - clip, 1 + clip)), plus ``beta * kl``
    per token when given (GRPO's penalty in the loss), aggregated by ``mode``.

    ``advantages`` is [b, T], or [b] for one advantage per response (broadcast over its tokens). Returns
    the loss and detached statistics: clip_fraction, approx_kl (to the rollout policy), and kl_loss."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    per_token = torch.maximum(unclipped, clipped)
    stats: dict[str, torch.Tensor] = {}
    if kl is not None:
        per_token = per_token + beta * kl
        stats["kl_loss"] = aggregate(kl.detach(), mask, mode, tokens)
    loss = aggregate(per_token, mask, mode, tokens)
    m = mask.to(logp.dtype)
    count = m.sum().clamp(min=1)
    stats["clip_fraction"] = ((clipped > unclipped).to(logp.dtype) * m).sum().detach() / count
    stats["approx_kl"] = (0.5 * log_ratio.detach() ** 2 * m).sum() / count
    return loss, stats
