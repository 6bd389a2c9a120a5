"""Attention-kernel plugins (``attention`` kind): softmax(q k^T / sqrt(d) + bias) v, always causal.

A kernel only does the core product; projections and position encoding live in the model's Attention.
``bias`` is the position plugin's additive bias (ALiBi), which already contains the causal mask; with
``bias=None`` the kernel applies the causal mask itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from haina.plugins.registry import register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, k_len] mask, True where attention is allowed.

    The queries are the *last* q_len of the k_len positions (a KV cache holds the earlier ones), so query
    i may see keys 0 .. k_len - q_len + i; ``is_causal=True`` would instead align them to the start.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


@register("attention", "sdpa")
class SDPAttention(nn.Module):
    """torch's scaled_dot_product_attention: FlashAttention for the plain causal case on GPU, the
    memory-efficient kernel (the xFormers one, taking an additive bias) when a bias is given."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """q [b, h, q_len, d], k and v [b, h, k_len, d] -> [b, h, q_len, d]."""
        q_len, k_len = q.shape[-2], k.shape[-2]
        if bias is not None:
            # The kernels want the mask in the compute dtype; the causal -inf survives the cast.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        if q_len == k_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device))
