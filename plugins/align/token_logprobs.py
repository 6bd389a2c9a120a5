"""Per-token log-probabilities and entropy of the policy, from hidden states and the head weight in chunks.

Why: RL algorithms need log pi(token) at every response position for the actor (with gradients) and the
frozen reference, and the entropy for logging. Computing them from the head's full logits materialises
[tokens, vocab] in fp32 (2 GB per 4,096 tokens at Baichuan 2's 125,696 pieces) and autograd keeps it, and
its softmax, for the backward. Here the logits exist one chunk at a time; the forward keeps only three
numbers per row (log-prob, logsumexp, entropy) and the backward recomputes each chunk's logits (one more
matmul per chunk, as activation checkpointing would) to build d/d(logits) in the chunk's buffer.

:func:`haina.core.loss.chunked_lm_loss` cannot serve here: it returns a mean and computes its gradient in
the forward, while a policy loss needs the per-token values and only knows their gradient later.

Under tensor parallelism the head weight is this rank's vocabulary rows: the row max, exp-sum, target
logit and sum p * z are reduced over the tp group (small [n] all-reduces), never the logits, and the
gradient of the hidden states is summed over the group, as in the vocabulary-parallel loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from haina.core import collectives
from haina.core.loss import LossOutput, VocabShard, add_product, vocab_shard_of
from haina.plugins.align.common import IGNORE

if TYPE_CHECKING:
    from haina.core.engine import Engine

__all__ = ["TokenLogps", "chunked_token_logps", "model_token_logps", "trained_token_logps"]


@dataclass
class TokenLogps:
    """log pi(target) per position (0 where the target is ignored) and, if asked, the entropy there."""

    logp: Tensor
    entropy: Tensor | None = None


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: Tensor, w: Tensor, inv_temp: float, allowed: int) -> Tensor:
    """fp32 logits of one chunk (already divided by the temperature), -inf past the allowed columns."""
    z = (h @ w.T).float()
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    if allowed < z.shape[1]:
        z[:, max(allowed, 0) :] = float("-inf")
    return z


class _ChunkedTokenLogps(torch.autograd.Function):
    """Forward: per-row log-prob, logsumexp and entropy chunk by chunk; backward recomputes the chunks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_size: int,
        inv_temp: float,
        allowed: int,
        shard: VocabShard | None,
        want_entropy: bool,
    ) -> tuple[Tensor, Tensor]:
        compute_dtype = _compute_dtype(hidden, weight)
        n, width = hidden.shape[0], weight.shape[0]
        start = 0 if shard is None else shard.start
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(logp)
            entropy = torch.zeros_like(logp)
            own = (targets >= start) & (targets < start + width)
            local_target = torch.where(own, targets - start, 0)
            for c0 in range(0, n, chunk_size):
                c1 = min(c0 + chunk_size, n)
                z = _chunk_logits(hidden[c0:c1].to(compute_dtype), w, inv_temp, allowed)
                target_z = torch.where(own[c0:c1], z.gather(1, local_target[c0:c1, None])[:, 0], 0.0)
                row_max = z.max(dim=1).values
                if shard is not None:
                    collectives.all_reduce(row_max, "max", group=shard.group)
                z.sub_(row_max[:, None])  # z - max; masked columns stay -inf
                if want_entropy:
                    e = z.exp()
                    ez = z.mul_(e).masked_fill_(e == 0, 0.0).sum(dim=1)  # sum e (z - max); 0 * -inf where masked
                    stacked = torch.stack([e.sum(dim=1), target_z, ez])
                else:
                    e = z.exp_()  # in place: one [chunk, V] buffer in all
                    stacked = torch.stack([e.sum(dim=1), target_z])
                if shard is not None:
                    collectives.all_reduce(stacked, group=shard.group)
                sum_e = stacked[0]
                chunk_lse = row_max + sum_e.log()
                lse[c0:c1] = chunk_lse
                logp[c0:c1] = stacked[1] - chunk_lse
                if want_entropy:
                    # H = lse - sum p z = log(sum e) - sum e (z - max) / sum e
                    entropy[c0:c1] = sum_e.log() - stacked[2] / sum_e
                del z, e
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.config = (chunk_size, inv_temp, allowed, shard, compute_dtype)
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_logp: Tensor | None, grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        chunk_size, inv_temp, allowed, shard, compute_dtype = ctx.config
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None
        n, width = hidden.shape[0], weight.shape[0]
        start = 0 if shard is None else shard.start
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            own = (targets >= start) & (targets < start + width)
            local_target = torch.where(own, targets - start, 0)
            for c0 in range(0, n, chunk_size):
                c1 = min(c0 + chunk_size, n)
                h = hidden[c0:c1].to(compute_dtype)
                z = _chunk_logits(h, w, inv_temp, allowed)
                z.sub_(lse[c0:c1, None])  # log p of every column (-inf where masked)
                # d logp_t / dz = onehot(t) - p;  d H / dz = -p (log p + H); built in z's buffer
                if grad_entropy is None:
                    g = z.exp_().mul_(-grad_logp[c0:c1, None])
                else:
                    p = z.exp()
                    g = z.add_(entropy[c0:c1, None]).mul_(p).masked_fill_(p == 0, 0.0)  # 0 * -inf where masked
                    g.mul_(-grad_entropy[c0:c1, None])
                    if grad_logp is not None:
                        g.sub_(p.mul_(grad_logp[c0:c1, None]))
                    del p
                if grad_logp is not None:
                    rows = torch.arange(c1 - c0, device=g.device)
                    g.index_put_(
                        (rows, local_target[c0:c1]), torch.where(own[c0:c1], grad_logp[c0:c1], 0.0), accumulate=True
                    )
                if inv_temp != 1.0:
                    g.mul_(inv_temp)
                g = g.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[c0:c1] = g @ w
                if grad_weight is not None:
                    add_product(grad_weight, g, h)
                del g
            if grad_hidden is not None and shard is not None:
                # each rank's columns give a partial d/d(hidden); the hidden states are the same on all
                collectives.all_reduce(grad_hidden, group=shard.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_token_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    *,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
    entropy: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    ignore_index: int = IGNORE,
) -> TokenLogps:
    """log softmax(hidden @ weight^T / temperature)[target] per row, never holding more than [chunk x V].

    ``hidden`` [N, H], ``weight`` [V, H] (any autograd tensor, e.g. a NormHead's normalised weight),
    ``targets`` [N]; rows whose target is ``ignore_index`` get 0 and cost nothing (only the others are
    multiplied with the head). ``vocab_limit``: ids at or past it are outside the distribution (a
    vocabulary padded past its tokenizer's, which generation never samples). The matmuls run in the
    ambient autocast dtype, the softmax math in fp32. Differentiable in ``hidden`` and ``weight``
    through both outputs.

    Vocabulary parallel: with ``tp_group``, ``weight`` is this rank's rows [vocab_start, vocab_start + V)
    of the head and ``hidden`` and ``targets`` (global ids) are the same on every rank of the group.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError("chunked_token_logps wants hidden [N, H], weight [V, H] and targets [N]")
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if chunk_size <= 0 or temperature <= 0:
        raise ValueError(f"chunk_size and temperature must be positive, got {chunk_size} and {temperature}")
    n = targets.shape[0]
    rows = (targets != ignore_index).nonzero()[:, 0]
    zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if rows.numel() == 0:  # the same on every tp rank: the targets are
        extra = torch.zeros_like(zeros) if entropy else None
        return TokenLogps(zeros + 0.0 * hidden.sum() + 0.0 * weight.sum(), extra)
    allowed = weight.shape[0] if vocab_limit is None else vocab_limit - vocab_start
    shard = None if tp_group is None else VocabShard(tp_group, vocab_start)
    logp, ent = _ChunkedTokenLogps.apply(
        hidden.index_select(0, rows), weight, targets.index_select(0, rows), chunk_size, 1.0 / temperature,
        allowed, shard, entropy,
    )
    return TokenLogps(zeros.index_put((rows,), logp), zeros.index_put((rows,), ent) if entropy else None)


def model_token_logps(
    model: nn.Module,
    tokens: Tensor,
    targets: Tensor,
    chunk_size: int,
    *,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
    entropy: bool = False,
    positions: Tensor | None = None,
    segments: Tensor | None = None,
) -> TokenLogps:
    """[b, s] log-probabilities (and entropies) of ``targets`` under a Transformer, without full logits;
    ``positions`` and ``segments`` [b, s] for packed rows (see :mod:`haina.plugins.align.packing`).

    Reads ``model.head.effective_weight()`` after the forward: the caller runs this where the head weight
    is whole, i.e. on a model whose FSDP unit keeps its parameters gathered after forward (the root, or
    ``set_reshard_after_forward(False)``), and inside the DeepSpeed engine's forward under ZeRO-3
    (``engine.forward_loss``), as the chunked language-model loss does.
    """
    # DTensor only under tp (its import costs ~0.4 s that other layouts need not pay)
    from torch.distributed.tensor import DTensor, Replicate

    hidden = model(tokens, positions, segments=segments)
    if isinstance(hidden, DTensor):
        hidden = hidden.redistribute(hidden.device_mesh, [Replicate()] * hidden.device_mesh.ndim).to_local()
    weight, shard = vocab_shard_of(model.head.effective_weight())
    out = chunked_token_logps(
        hidden.flatten(0, 1), weight, targets.flatten(), chunk_size, temperature=temperature, vocab_limit=vocab_limit,
        entropy=entropy, tp_group=None if shard is None else shard.group, vocab_start=0 if shard is None else shard.start,
    )
    return TokenLogps(
        out.logp.view(targets.shape), None if out.entropy is None else out.entropy.view(targets.shape)
    )


def _logps_as_loss_output(
    model: nn.Module, submodule: str | None, tokens: Tensor, targets: Tensor, chunk_size: int, options: dict[str, Any]
) -> LossOutput:
    out = model_token_logps(getattr(model, submodule) if submodule else model, tokens, targets, chunk_size, **options)
    return LossOutput(out.logp, {} if out.entropy is None else {"entropy": out.entropy})


def trained_token_logps(
    engine: Engine,
    tokens: Tensor,
    targets: Tensor,
    chunk_size: int,
    *,
    submodule: str | None = None,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
    entropy: bool = False,
    positions: Tensor | None = None,
    segments: Tensor | None = None,
) -> TokenLogps:
    """:func:`model_token_logps` of the engine's trained model (or its ``submodule``, PPO's ``actor``), run
    through ``engine.forward_loss``: DeepSpeed ZeRO-3 gathers a weight read outside its module's forward
    (the head's, here) only inside its engine's forward."""
    options = {"temperature": temperature, "vocab_limit": vocab_limit, "entropy": entropy, "positions": positions,
               "segments": segments}
    out = engine.forward_loss(_logps_as_loss_output, submodule, tokens, targets, chunk_size, options)
    return TokenLogps(out.loss, out.parts.get("entropy"))
