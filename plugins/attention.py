"""Attention-kernel plugins (``attention`` kind): softmax(q k^T / sqrt(d) + bias) v, always causal.

A kernel only does the core product; projections and position encoding live in the model's Attention.
What the kernel must mask and bias arrives as one :class:`AttentionInputs` per forward (positions,
packed-document segment ids, this rank's ALiBi slopes, the KV-cache offset), not as a dense bias: a dense
[b, h, q, k] bias is what sdpa wants, but flex wants a block mask and a score_mod, flash-attn wants
cu_seqlens, and building the dense one for them would cost the very memory they exist to save.

Interface of a kernel plugin, constructed as ``Plugin(cfg)``:

- ``prepare(inputs) -> Any``: what the kernel needs from the mask info; the model calls it once per
  forward, outside the (possibly compiled) blocks, and stores it in ``inputs.prepared``.
- ``forward(q, k, v, inputs) -> out``: q [b, h, q_len, d], k and v [b, h, k_len, d] -> [b, h, q_len, d].
  ``inputs`` may also be None (plain causal) or a dense additive bias tensor, for direct use.

Kernels: ``sdpa`` (torch, everywhere, the fallback), ``flex`` (torch flex attention: ALiBi as a score_mod,
causal + document mask as a block mask), ``flash`` (flash-attn, CUDA fp16/bf16, varlen for packed
documents) and ``xformers`` (memory-efficient attention, CUDA), the last two in :mod:`attention_gpu`.
``auto`` (:mod:`attention_select`) picks the fastest one installed that suits the position encoding,
device and dtype, and logs the choice once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.kv_cache import attention_mask
from haina.plugins.registry import register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig

# What a position plugin asks of the kernel (its class attribute ``bias_kind``): "none" = nothing but the
# causal mask (RoPE), "alibi" = a per-head linear distance bias given by ``slopes``, "dense" = only an
# arbitrary dense bias from ``bias()`` (an unknown third-party plugin), which only sdpa can take.
BIAS_KINDS: tuple[str, ...] = ("none", "alibi", "dense")
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, k_len] mask, True where attention is allowed.

    The queries are the *last* q_len of the k_len positions (a KV cache holds the earlier ones), so query
    i may see keys 0 .. k_len - q_len + i; ``is_causal=True`` would instead align them to the start.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


# ------------------------------------------------------------------------------------------ mask info

@dataclass(eq=False)
class AttentionInputs:
    """Everything a kernel needs to mask and bias one forward's attention, built once by the model.

    Positions are [s] or [b, s]; segment ids [b, s] (1, 2, ... per packed document, 0 = padding) are None
    when the batch is one causal document per row with no cache. Keys are the last ``k_len`` slots, of
    which the queries are the last ``q_len`` (``offset`` = cached slots before them).
    """

    q_positions: torch.Tensor
    k_positions: torch.Tensor
    q_segments: torch.Tensor | None
    k_segments: torch.Tensor | None
    batch: int
    q_len: int
    k_len: int
    device: torch.device
    dtype: torch.dtype
    bias_kind: str = "none"
    slopes: torch.Tensor | None = None  # ALiBi slopes of this rank's heads (tensor parallel: a slice)
    bias_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None
    prepared: Any = None
    _dense: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def offset(self) -> int:
        return self.k_len - self.q_len

    @property
    def masked(self) -> bool:
        """True when segment ids (packing, padding or a cache) restrict attention beyond causality."""
        return self.q_segments is not None

    def dense_bias(self) -> torch.Tensor | None:
        """fp32 additive bias [h, q, k] or [b, h, q, k] with -inf where attention is not allowed, or None
        for the plain (offset-aligned) causal mask; built on first use and shared by all layers."""
        if "bias" not in self._dense:
            bias = None if self.bias_fn is None else self.bias_fn(self.q_positions, self.k_positions)
            if self.masked:
                assert self.q_segments is not None and self.k_segments is not None
                allowed = attention_mask(self.q_segments, self.k_segments)[:, None]  # [b, 1, q, k]
                if bias is None:
                    bias = torch.zeros(allowed.shape, device=allowed.device)
                bias = bias.masked_fill(~allowed, float("-inf"))
            self._dense["bias"] = bias
        return self._dense["bias"]

    @staticmethod
    def plain(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> AttentionInputs:
        """Inputs for a direct call with an optional dense bias (tests, external callers)."""
        q_len, k_len = q.shape[-2], k.shape[-2]
        inputs = AttentionInputs(
            torch.arange(k_len - q_len, k_len, device=q.device), torch.arange(k_len, device=q.device),
            None, None, q.shape[0], q_len, k_len, q.device, q.dtype,
            bias_kind="none" if bias is None else "dense",
        )
        inputs._dense["bias"] = bias
        return inputs


def _as_inputs(q: torch.Tensor, k: torch.Tensor, inputs: AttentionInputs | torch.Tensor | None) -> AttentionInputs:
    return inputs if isinstance(inputs, AttentionInputs) else AttentionInputs.plain(q, k, inputs)


class Kernel(nn.Module):
    """Base of the built-in kernels: ``forward`` = ``attend`` with the prepared mask info."""

    name = "?"
    takes_inputs = True  # the model passes AttentionInputs (a kernel without this gets the dense bias)

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()

    def prepare(self, inputs: AttentionInputs) -> Any:
        return None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, prepared: Any
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs | torch.Tensor | None
    ) -> torch.Tensor:
        """q [b, h, q_len, d], k and v [b, h, k_len, d] -> [b, h, q_len, d]."""
        inputs = _as_inputs(q, k, inputs)
        prepared = inputs.prepared if inputs.prepared is not None else self.prepare(inputs)
        return self.attend(q, k, v, inputs, prepared)


# ----------------------------------------------------------------------------------------------- sdpa

def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """scaled_dot_product_attention with a dense bias, or the plain causal mask aligned to the keys' end."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    if bias is not None:
        # The kernels want the mask in the compute dtype; the causal -inf survives the cast.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device))


@register("attention", "sdpa")
class SDPAttention(Kernel):
    """torch's scaled_dot_product_attention: FlashAttention for the plain causal case on GPU, the
    memory-efficient kernel (the xFormers one, taking an additive bias) when a bias is given."""

    name = "sdpa"

    def prepare(self, inputs: AttentionInputs) -> torch.Tensor | None:
        return inputs.dense_bias()

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

    return torch.compile(flex_attention, dynamic=False)


@register("attention", "flex")
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
        block_mask = create_block_mask(mask_mod, batch, None, inputs.q_len, inputs.k_len, device=inputs.device)
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
