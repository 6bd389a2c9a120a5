"""The torch attention kernels (kind ``attention``): ``sdpa`` (everywhere, the fallback) and ``flex``.

``flex`` takes ALiBi as a score_mod and the causal + document mask as a block mask; ``flash`` and
``xformers`` are in :mod:`attention_gpu`, ``auto`` in :mod:`attention_auto`. The contract they implement,
and the requirement checks, are in :mod:`haina.core.attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from haina.core.attention import ALL_DEVICES, AttentionInputs, Kernel, KernelSpec, sdpa_attend
from haina.core.registry import register


# On CUDA sdpa runs flash or the memory-efficient kernel (the latter with a bias): no saved scores.
@register("attention", "sdpa", requirements=KernelSpec(
    devices=ALL_DEVICES, auto_rank={"cuda": 3, "cpu": 0}, saves_scores=("cpu", "mps", "xpu", "meta"),
))
class SDPAttention(Kernel):
    """torch's scaled_dot_product_attention: FlashAttention for the plain causal case on GPU, the
    memory-efficient kernel (the xFormers one, taking an additive bias) when a bias is given."""

    name = "sdpa"

    def prepare(self, inputs: AttentionInputs) -> torch.Tensor | None:
        return inputs.kernel_bias()

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, prepared: Any
    ) -> torch.Tensor:
        return sdpa_attend(q, k, v, prepared)


# ----------------------------------------------------------------------------------------------- flex

def flex_mods(inputs: AttentionInputs) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor] | None]:
    """(mask_mod, score_mod) of flex attention for these inputs; both also work on broadcast index tensors.

    The mask is causal by slot (aligned to the keys' end) and, with segment ids, keeps a query inside its
    own document (a padding query sees only its own slot, as :func:`attention_mask` says). ALiBi is the
    score_mod slope_h * (k_pos - q_pos), in fp32 on positions, so packed documents that restart their
    positions get the same bias as sdpa's dense one.
    """
    offset = inputs.offset
    if inputs.q_segments is None:
        def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
            return kv <= q + offset
    else:
        qs, ks = inputs.q_segments, inputs.k_segments
        assert ks is not None

        def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
            same = (qs[b, q] == ks[b, kv]) & (ks[b, kv] != 0)
            return (kv <= q + offset) & (same | (kv == q + offset))

    if inputs.slopes is None:
        return mask_mod, None
    slopes = inputs.slopes.float()
    qp, kp = inputs.q_positions, inputs.k_positions
    if qp.dim() == 1:
        qp, kp = qp[None], kp[None]
    one_row = qp.shape[0] == 1

    def score_mod(score: torch.Tensor, b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
        row = 0 if one_row else b
        return score + slopes[h] * (kp[row, kv] - qp[row, q]).float()

    return mask_mod, score_mod


def flex_dense_bias(inputs: AttentionInputs, heads: int) -> torch.Tensor:
    """The flex mods evaluated on the full index grid: fp32 [b, heads, q, k] with -inf where masked.

    Used for flex's backward on CPU, which torch does not implement (so gradients there come from the
    same score_mod/mask_mod, materialized)."""
    mask_mod, score_mod = flex_mods(inputs)
    dev = inputs.device
    b = torch.arange(inputs.batch, device=dev)[:, None, None, None]
    h = torch.arange(heads, device=dev)[None, :, None, None]
    q = torch.arange(inputs.q_len, device=dev)[None, None, :, None]
    kv = torch.arange(inputs.k_len, device=dev)[None, None, None, :]
    shape = (inputs.batch, heads, inputs.q_len, inputs.k_len)
    zero = torch.zeros(shape, device=dev)
    bias = zero if score_mod is None else score_mod(zero, b, h, q, kv).expand(shape)
    return bias.masked_fill(~mask_mod(b, h, q, kv).expand(shape), float("-inf"))


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: a second width marks the sequence dimensions dynamic instead of compiling per width
    return torch.compile(flex_attention)


@register("attention", "flex", requirements=KernelSpec(
    "torch.nn.attention.flex_attention", ("cuda", "cpu"), None, ("none", "alibi"), auto_rank={"cuda": 1},
    saves_scores=("cpu",),  # CPU's backward goes through the dense scores
))
class FlexAttention(Kernel):
    """torch's flex attention: ALiBi as a score_mod, causal + document mask as a block mask, no dense bias.

    On CUDA the fused (compiled) kernel. On CPU torch has flex's forward only, and compiles it for tens of
    seconds per shape, so CPU runs the unfused eager forward and, when gradients are needed, takes them
    from the same mods materialized densely (slow; for tests and parity, not for speed).
    """

    name = "flex"

    def prepare(self, inputs: AttentionInputs) -> tuple[Any, Any]:
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod, score_mod = flex_mods(inputs)
        batch = None if inputs.q_segments is None else inputs.batch
        # Compiled on CUDA: uncompiled, it evaluates the mask densely ([B, 1, Q, K] plus int64 index
        # temporaries) every forward; on CPU the eager path is the one that works without a compiler.
        block_mask = create_block_mask(
            mask_mod, batch, None, inputs.q_len, inputs.k_len, device=inputs.device,
            _compile=inputs.device.type == "cuda",
        )
        return block_mask, score_mod

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, prepared: Any
    ) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        block_mask, score_mod = prepared
        if q.device.type == "cuda" and not inputs.offset:  # decoding shapes change every step: no compile
            return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        # CPU with autograd: the value of flex's kernel, the gradient of the same mods made dense.
        with torch.no_grad():
            value = flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod, block_mask=block_mask)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=flex_dense_bias(inputs, q.shape[1]).to(q.dtype))
        return dense + (value - dense).detach()
