"""Position-encoding plugins (``position`` kind): RoPE (Baichuan 2 7B) and ALiBi (Baichuan 2 13B).

Interface of a position plugin, constructed as ``Plugin(cfg)``:

- ``forward(q, k, positions) -> (q, k)``: q, k [batch, heads, seq, head_dim]; positions LongTensor [seq]
  or [batch, seq]. Rotates (RoPE) or passes through (ALiBi).
- ``bias(q_positions, k_positions) -> Tensor | None``: an fp32 additive attention bias [heads, q, k]
  ([batch, heads, q, k] for batched positions) that already contains the causal mask, or None when the
  kernel should apply the plain causal mask itself.
- ``bias_kind`` (class attribute): "none" (RoPE: causal mask only), "alibi" (the module has ``slopes`` of
  its heads, so kernels can bias without the dense tensor) or "dense" (only ``bias()``; sdpa only).

The model builds one instance and shares it across all layers. Position math is fp32 even under bf16
autocast: bf16 has 8 significant bits and cannot tell positions above 256 apart.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from haina.core.errors import ConfigError
from haina.core.registry import register
from haina.plugins.model.norm import autocast_off

if TYPE_CHECKING:
    from haina.core.config import ModelConfig


# ----------------------------------------------------------------------------------------------- RoPE

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension: the "rotate_half" layout (halves, not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register("position", "rope")
class RotaryEmbedding(nn.Module):
    """Rotary position embedding, base cfg.rope_base, applied to q and k.

    cos/sin are computed on the fly from the positions (a [seq, head_dim] outer product, negligible next to
    attention), so there is no cache to go stale, no state_dict entry, and nothing to re-fill after the
    model is materialized from the meta device.
    """

    bias_kind = "none"  # the kernel applies only the causal mask (see haina.plugins.model.attention)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {cfg.head_dim}")
        self.head_dim = cfg.head_dim
        self.base = cfg.rope_base

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """fp32 [head_dim / 2]: base^(-2i/d)."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponent)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin, [..., seq, head_dim], for positions [..., seq]."""
        with autocast_off(positions.device):
            angles = positions.to(torch.float32)[..., None] * self.inv_freq(positions.device)
            angles = torch.cat((angles, angles), dim=-1)
            return angles.cos(), angles.sin()

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if cos.dim() == 3:  # batched positions [b, s, d] -> broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return x * cos + rotate_half(x) * sin

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [b, h, s, d] rotated, returned in fp32 (before any cast back to the compute dtype)."""
        with autocast_off(x.device):
            cos, sin = self.cos_sin(positions)
            return self._rotate(x.float(), cos, sin)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_off(q.device):
            cos, sin = self.cos_sin(positions)
            q_rot = self._rotate(q.float(), cos, sin)
            k_rot = self._rotate(k.float(), cos, sin)
        return q_rot.to(q.dtype), k_rot.to(k.dtype)

    def bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> None:
        """RoPE needs no additive bias; the kernel applies the causal mask."""
        return None

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


# ---------------------------------------------------------------------------------------------- ALiBi

def _geometric_slopes(n: int) -> list[float]:
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """fp32 [n_heads] slopes of the ALiBi reference code.

    A power of two n gets 2^(-8(i+1)/n). Otherwise, with c the largest power of two below n: the c slopes
    for c heads, then every second slope of the 2c series, the first n - c of them (40 heads: 2^(-k/4),
    k = 1..32, then 2^(-(2j+1)/8), j = 0..7).
    """
    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    c = 2 ** math.floor(math.log2(n_heads))
    slopes = _geometric_slopes(c)
    if c < n_heads:
        slopes += _geometric_slopes(2 * c)[0::2][: n_heads - c]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """fp32 slope_h * (j - i), -inf where key j is after query i.

    A function of the slopes tensor alone so a tensor-parallel rank can pass just its own heads' slopes.
    Shapes: slopes [h], positions [q] and [k] -> [h, q, k]; positions [b, q] and [b, k] -> [b, h, q, k].
    """
    with autocast_off(slopes.device):
        rel = (k_positions[..., None, :] - q_positions[..., :, None]).to(torch.float32)[..., None, :, :]
        bias = slopes.to(torch.float32)[:, None, None] * rel
        return bias.masked_fill(rel > 0, float("-inf"))


@register("position", "alibi")
class ALiBi(nn.Module):
    """Attention with linear biases: q and k untouched, a per-head linear distance penalty as bias.

    ``slopes`` holds the slopes of this module's heads as a non-persistent buffer (derived from the head
    count, so not checkpointed): all heads, or under tensor parallelism only heads
    [head_start, head_start + len(slopes)) of this rank (:meth:`shard_heads`). :meth:`reset_parameters`
    refills it after materialization from the meta device.
    """

    slopes: torch.Tensor
    bias_kind = "alibi"  # kernels may read ``slopes`` instead of the dense bias (flex, flash)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_start = 0
        self.register_buffer("slopes", alibi_slopes(cfg.num_heads), persistent=False)

    def _own_slopes(self) -> torch.Tensor:
        return alibi_slopes(self.num_heads)[self.head_start : self.head_start + self.slopes.numel()]

    def reset_parameters(self) -> None:
        """Recompute the slopes in place (called by the model's init_weights, e.g. after ``to_empty``)."""
        with torch.no_grad():
            self.slopes.copy_(self._own_slopes().to(self.slopes.device))

    def shard_heads(self, rank: int, size: int) -> None:
        """Keep only the slopes of heads [rank * n / size, (rank + 1) * n / size): tp rank ``rank``'s heads."""
        if self.num_heads % size:
            raise ConfigError(f"ALiBi: tp={size} does not divide num_heads={self.num_heads}")
        local = self.num_heads // size
        self.head_start = rank * local
        self.slopes = alibi_slopes(self.num_heads)[self.head_start : self.head_start + local].to(self.slopes.device)

    def tp_plan(self, sequence_parallel: bool) -> dict[str, Any]:
        """Each tp rank biases only its own heads."""
        # the TP styles load torch's DTensor (~0.4 s): only tensor-parallel layouts pay for it
        from haina.core.parallel.tensor_parallel import ShardHeads

        return {"": ShardHeads()}

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        return alibi_bias(self.slopes, q_positions, k_positions)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"
