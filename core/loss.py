"""The loss contract (terms, their statistics, the output) and the chunked (split) language-model loss.

Why chunked: with Baichuan 2's 125,696-token vocabulary the logits of one 4,096-token sequence are
2 GB in fp32, and a plain forward+backward keeps several tensors of that size alive (logits, softmax,
their gradients). :func:`chunked_lm_loss` walks the sequence in chunks, finishes the forward *and* the
backward of each chunk before the next one starts, and keeps only d(loss)/d(hidden) and the accumulated
d(loss)/d(weight); the full [N x V] logits never exist. The matmuls are the same three a plain
forward+backward does (logits, grad of hidden, grad of weight), so it costs no extra compute.

A loss term is a class registered under kind ``"loss"`` with a class attribute ``metric`` and a method
``per_token(logits, targets) -> Tensor[n]`` (differentiable; fp32 logits in). That is all a third party
needs; the built-in terms (cross_entropy, max_z, z_loss) live in :mod:`haina.plugins.losses`. Terms may implement ``from_stats``: their value and gradient follow from a few per-row
statistics (max, argmax, logsumexp, target logit) that all terms share, so the chunked loss computes
those once per chunk and builds d(loss)/d(logits) in place in the logits buffer. A term without
``from_stats`` still works in the chunked loss: it is differentiated with autograd on the chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from haina.core import collectives
from haina.core.registry import get

__all__ = [
    "LogitStats",
    "LossOutput",
    "LossTerm",
    "RowGrad",
    "VocabShard",
    "chunked_lm_loss",
    "naive_lm_loss",
    "vocab_shard_of",
]


@dataclass(frozen=True)
class LogitStats:
    """Per-row statistics of one chunk of fp32 logits, shared by every term.

    These are exactly the quantities a vocabulary-parallel loss has to reduce across tensor-parallel
    ranks (max and argmax by a max-reduction, the exp-sum by a sum, the target logit from the rank that
    owns the target), which is why the terms see only them.
    """

    max: Tensor  # [n] fp32
    argmax: Tensor  # [n] int64
    lse: Tensor  # [n] fp32, logsumexp over the vocabulary
    target_logit: Tensor  # [n] fp32

    @classmethod
    def of(cls, logits: Tensor, targets: Tensor) -> LogitStats:
        """Differentiable statistics of full logits (for reference use; the chunked loss has its own)."""
        mx, amax = logits.max(dim=-1)
        return cls(mx, amax, torch.logsumexp(logits, dim=-1), logits.gather(-1, targets[:, None])[:, 0])


@dataclass
class RowGrad:
    """d(term)/d(logits) of one row as coefficients of three row-shaped pieces.

    Every built-in term's gradient is ``softmax * p + onehot(target) * t + onehot(argmax) * a`` with
    per-row ``p``, ``t``, ``a``; stating it this way lets the chunked loss build the whole gradient in
    the logits buffer without any further [n x V] tensor. ``None`` means zero.
    """

    softmax: Tensor | None = None
    target: Tensor | None = None
    argmax: Tensor | None = None


class LossTerm:
    """Base class of a loss term (optional: any class with ``metric`` and ``per_token`` will do)."""

    metric: ClassVar[str] = ""

    def per_token(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Raw per-position value from fp32 logits [n, V] and targets [n]; must be differentiable."""
        raise NotImplementedError


@dataclass
class LossOutput:
    """The differentiable total and, for logging, each term's detached contribution (coef * mean)."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


def _resolve(terms: dict[str, float], settings: Mapping[str, Any] | None = None) -> list[tuple[float, Any]]:
    """(coef, instance) per registered term name; an unknown name fails with the list of names. A term
    class is built as ``Term()``, or ``Term(settings)`` when ``settings`` (its ``loss.<name>`` section)
    has an entry for it; a registered ready instance is used as is."""
    if not terms:
        raise ValueError("at least one loss term is needed")
    resolved = []
    for name, coef in terms.items():
        obj = get("loss", name)
        own = None if settings is None else settings.get(name)
        if isinstance(obj, type):
            obj = obj() if own is None else obj(own)
        resolved.append((float(coef), obj))
    return resolved


def _masked_mean_terms(values: Tensor, valid: Tensor, denom: Tensor) -> Tensor:
    """Sum over valid rows / denom; ``where`` (not a product) so a NaN at an ignored row cannot leak."""
    return torch.where(valid, values.float(), 0.0).sum() / denom


def naive_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    terms: dict[str, float],
    chunk_size: int = 0,
    ignore_index: int = -100,
    settings: Mapping[str, Any] | None = None,
) -> LossOutput:
    """Reference: full [N x V] logits and plain autograd (``chunk_size`` is accepted and ignored)."""
    del chunk_size
    resolved = _resolve(terms, settings)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    denom = valid.sum().clamp(min=1).float()
    logits = (hidden @ weight.T).float()
    parts: dict[str, Tensor] = {}
    total = hidden.new_zeros((), dtype=torch.float32)
    for coef, term in resolved:
        value = coef * _masked_mean_terms(term.per_token(logits, safe), valid, denom)
        parts[term.metric] = value.detach()
        total = total + value
    return LossOutput(total, parts)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + rows) of a vocabulary split evenly over the tp ``group``."""

    group: dist.ProcessGroup
    start: int


def vocab_shard_of(weight: Tensor) -> tuple[Tensor, VocabShard | None]:
    """(local rows, their place) of a head weight: a DTensor Shard(0) on a 1-D tp mesh, or a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return weight, None
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"vocabulary-parallel loss wants the head weight as Shard(0) on a 1-D tp mesh, got "
            f"{tuple(weight.placements)} on a {mesh.ndim}-D mesh"
        )
    local = weight.to_local()
    if local.shape[0] * mesh.size() != weight.shape[0]:
        raise ValueError(f"vocabulary {weight.shape[0]} is not split evenly over tp={mesh.size()}")
    return local, VocabShard(mesh.get_group(), mesh.get_local_rank() * local.shape[0])


def _gather_vocab(logits: Tensor, shard: VocabShard) -> Tensor:
    """Full [n, V] logits of a chunk, for loss terms that have no per-row-statistics form."""
    pieces = [torch.empty_like(logits) for _ in range(dist.get_world_size(shard.group))]
    collectives.all_gather(pieces, logits.contiguous(), group=shard.group)
    return torch.cat(pieces, dim=1)


def _chunk_terms(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    row_scale: Tensor,
    terms: Sequence[tuple[float, Any]],
    need_grad: bool,
    shard: VocabShard | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Evaluate all terms on one chunk and, if asked, d(sum of scaled terms)/d(logits).

    ``logits`` is the chunk's fp32 [n, V] buffer and is consumed: on return it holds the gradient (or
    garbage). ``row_scale`` is 1/(valid positions of the whole input) on valid rows, 0 elsewhere, so the
    per-chunk sums add up to the global mean. Returns (per-term sum of row_scale * value, without the
    coefficient) and the gradient including the coefficients.

    With ``shard`` (vocabulary parallelism) ``logits`` holds only this rank's vocabulary columns and
    ``targets`` are global ids: the row max, argmax, exp-sum and target logit are reduced across the tp
    group (three small all-reduces of [n]) before any term sees them, so every rank gets the same values
    and the gradient for its own columns. Terms without ``from_stats`` see the chunk's gathered logits.
    """
    n, width = logits.shape
    start = 0 if shard is None else shard.start
    sums: list[Tensor] = []
    extra_grad: Tensor | None = None

    # Terms without a fused path: plain autograd on the chunk, before the buffer is overwritten.
    for coef, term in terms:
        if hasattr(term, "from_stats"):
            continue
        full = logits if shard is None else _gather_vocab(logits, shard)
        if need_grad:
            with torch.enable_grad():
                x = full.detach().requires_grad_(True)
                value = term.per_token(x, targets).float()
                scaled = torch.where(valid, value * row_scale, 0.0).sum()
                (g,) = torch.autograd.grad(coef * scaled, x)
            g = g[:, start : start + width]
            extra_grad = g if extra_grad is None else extra_grad.add_(g)
            scaled = scaled.detach()
        else:
            value = term.per_token(full, targets).float()
            scaled = torch.where(valid, value * row_scale, 0.0).sum()
        sums.append(scaled)

    # Shared statistics, computed in place: logits -> exp(logits - max).
    row_max, row_argmax = logits.max(dim=-1)
    own_target = (targets >= start) & (targets < start + width)
    local_target = torch.where(own_target, targets - start, 0)
    target_logit = torch.where(own_target, logits.gather(-1, local_target[:, None])[:, 0], 0.0)
    if shard is not None:
        local_max = row_max
        row_max = local_max.clone()
        collectives.all_reduce(row_max, "max", group=shard.group)
        # Global argmax: the lowest global id among the ranks holding the row max.
        sentinel = torch.iinfo(torch.long).max
        row_argmax = torch.where(local_max == row_max, row_argmax + start, sentinel)
        collectives.all_reduce(row_argmax, "min", group=shard.group)
    exp = logits.sub_(row_max[:, None]).exp_()
    sum_exp = exp.sum(dim=-1)
    if shard is not None:
        both = torch.stack((sum_exp, target_logit))
        collectives.all_reduce(both, group=shard.group)  # SUM; only the owner contributed a target logit
        sum_exp, target_logit = both.unbind(0)
    stats = LogitStats(row_max, row_argmax, row_max + sum_exp.log(), target_logit)

    coef_soft: Tensor | None = None
    coef_target: Tensor | None = None
    coef_argmax: Tensor | None = None
    fused_sums: list[Tensor] = []
    for coef, term in terms:
        if not hasattr(term, "from_stats"):
            continue
        value, row_grad = term.from_stats(stats)
        fused_sums.append(torch.where(valid, value * row_scale, 0.0).sum())
        if need_grad:
            if row_grad.softmax is not None:
                part = coef * row_grad.softmax
                coef_soft = part if coef_soft is None else coef_soft + part
            if row_grad.target is not None:
                part = coef * row_grad.target
                coef_target = part if coef_target is None else coef_target + part
            if row_grad.argmax is not None:
                part = coef * row_grad.argmax
                coef_argmax = part if coef_argmax is None else coef_argmax + part
    # Back into the order the caller listed the terms in.
    fused_iter = iter(fused_sums)
    generic_iter = iter(sums)
    ordered = [next(fused_iter) if hasattr(term, "from_stats") else next(generic_iter) for _, term in terms]
    term_sums = torch.stack(ordered)

    if not need_grad:
        return term_sums, None
    # d/dlogits, built in the same buffer: softmax * (coef_soft * row_scale) + scattered one-hots.
    grad = exp
    if coef_soft is None:
        grad.zero_()
    else:
        grad.mul_((torch.where(valid, coef_soft * row_scale, 0.0) / sum_exp)[:, None])
    rows = torch.arange(n, device=logits.device)
    if coef_target is not None:
        scale = torch.where(valid & own_target, coef_target * row_scale, 0.0)
        grad.index_put_((rows, local_target), scale, accumulate=True)
    if coef_argmax is not None:
        own_argmax = (row_argmax >= start) & (row_argmax < start + width)
        scale = torch.where(valid & own_argmax, coef_argmax * row_scale, 0.0)
        grad.index_put_((rows, torch.where(own_argmax, row_argmax - start, 0)), scale, accumulate=True)
    if extra_grad is not None:
        grad.add_(extra_grad)
    return term_sums, grad


def add_product(acc: Tensor, grad: Tensor, h: Tensor) -> None:
    """``acc += grad.T @ h``: fused when ``acc`` has the product's dtype; else (an fp32 sum of bf16 products,
    which no kernel fuses) in vocabulary blocks, so the temporary product is never larger than the chunk's
    logits instead of one more weight-sized tensor. Shared by every chunked head-gradient path."""
    if acc.dtype == grad.dtype:
        acc.addmm_(grad.T, h)
        return
    n, vocab = grad.shape
    block = max(1, (n * vocab) // max(1, h.shape[1]))
    for v0 in range(0, vocab, block):
        acc[v0 : v0 + block].add_(grad[:, v0 : v0 + block].T @ h)


class _ChunkedLMLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        resolved: list[tuple[float, Any]],
        chunk_size: int,
        ignore_index: int,
        need_hidden: bool,
        need_weight: bool,
        shard: VocabShard | None,
    ) -> tuple[Tensor, Tensor]:
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        need_grad = need_hidden or need_weight
        with torch.autocast(device_type, enabled=False):
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)
            row_scale = valid.float() / valid.sum().clamp(min=1).float()
            w = weight.to(compute_dtype)  # one cast for all chunks, as autocast's cache would do
            grad_hidden = (
                torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
            )
            # Summed over chunks in fp32: a bf16 weight (FSDP2's bf16 parameters) would otherwise round the
            # running sum at every chunk; one chunk needs no wider accumulator.
            chunks = -(-hidden.shape[0] // chunk_size)
            acc_dtype = torch.float32 if chunks > 1 and weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            grad_weight = (
                torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
            )
            term_sums = torch.zeros(len(resolved), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                h = hidden[start:end].to(compute_dtype)
                logits = torch.mm(h, w.T).float()  # the only [chunk x V] buffer
                sums, grad = _chunk_terms(
                    logits, safe[start:end], valid[start:end], row_scale[start:end], resolved, need_grad, shard
                )
                term_sums += sums
                del logits
                if grad is None:
                    continue
                grad = grad.to(compute_dtype)  # no copy in fp32
                if grad_hidden is not None:
                    if grad_hidden.dtype == compute_dtype:
                        torch.mm(grad, w, out=grad_hidden[start:end])
                    else:
                        grad_hidden[start:end].copy_(grad @ w)
                if grad_weight is not None:
                    add_product(grad_weight, grad, h)  # a wider accumulator: low-precision products, summed in fp32
                del grad
            if grad_hidden is not None and shard is not None:
                # Each rank's columns give a partial d(loss)/d(hidden); the hidden states are replicated.
                collectives.all_reduce(grad_hidden, group=shard.group)
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = (grad_hidden, grad_weight)
        coefs = torch.tensor([c for c, _ in resolved], dtype=torch.float32, device=hidden.device)
        parts = term_sums * coefs
        ctx.mark_non_differentiable(parts)
        return parts.sum(), parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, grad_parts: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_lm_loss: backward ran twice; it keeps its gradients for one backward only"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # drop our references so autograd can adopt the buffers as .grad without a copy
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def chunked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    terms: dict[str, float],
    chunk_size: int,
    ignore_index: int = -100,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    settings: Mapping[str, Any] | None = None,
) -> LossOutput:
    """Sum of ``coef * mean(term)`` over valid positions, never holding more than [chunk x V] logits.

    ``hidden`` [N, H], ``weight`` [V, H] (any autograd tensor, e.g. a normalized head weight),
    ``targets`` [N]; ``terms`` maps registered loss-term names to coefficients. The matmuls run in the
    ambient autocast dtype, the loss math in fp32. When gradients are needed they are computed during
    the forward (one chunk at a time) and backward only scales them; the graph therefore supports a
    single backward.

    Vocabulary parallel: with ``tp_group``, ``weight`` is this rank's rows [vocab_start, vocab_start + V/tp)
    of the head, ``hidden`` and ``targets`` (global ids) are the same on every rank of the group, and the
    full logits are never gathered. Every rank returns the same loss; the gradient of ``hidden`` is
    summed over the group (so it is the full one on every rank) and that of ``weight`` stays local.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError("chunked_lm_loss wants hidden [N, H], weight [V, H] and targets [N]")
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    resolved = _resolve(terms, settings)
    grad_on = torch.is_grad_enabled()
    need_hidden = grad_on and hidden.requires_grad
    need_weight = grad_on and weight.requires_grad
    shard = None if tp_group is None else VocabShard(tp_group, vocab_start)
    loss, parts = _ChunkedLMLoss.apply(
        hidden, weight, targets, resolved, chunk_size, ignore_index, need_hidden, need_weight, shard
    )
    detached = parts.detach()
    return LossOutput(loss, {term.metric: detached[i] for i, (_, term) in enumerate(resolved)})
