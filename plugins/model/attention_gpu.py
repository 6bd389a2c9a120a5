"""The CUDA-only attention kernels: ``flash`` (flash-attn, fp16/bf16, varlen for packed documents) and
``xformers`` (memory-efficient attention with the ALiBi bias). Both fall back to sdpa for KV-cache decoding;
on the wrong device or dtype they fail in one line (:func:`~haina.plugins.model.attention_auto.check_runtime`).
"""

from __future__ import annotations

from typing import Any

import torch

from haina.core.attention import HALF_DTYPES, AttentionInputs, Kernel, KernelSpec, check_runtime, sdpa_attend
from haina.core.registry import register

# ---------------------------------------------------------------------------------------------- flash

def cu_seqlens_from_segments(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int32 cumulative lengths over the flattened [b * s] tokens, and the longest run, for varlen kernels.

    A sequence is a run of equal nonzero segment ids within a row; every padding token (0) is a sequence of
    its own, so it sees only itself, as in :func:`attention_mask`. Documents are assumed to be contiguous
    runs (as packing makes them).
    """
    b, s = segments.shape
    flat = segments.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    same = flat[1:] == flat[:-1]
    row_start = (torch.arange(1, b * s, device=flat.device) % s) == 0
    starts[1:] = ~same | row_start | (flat[1:] == 0)
    idx = torch.nonzero(starts).flatten()
    ends = torch.cat((idx[1:], idx.new_tensor([b * s])))
    cu = torch.cat((idx.new_zeros(1), ends)).to(torch.int32)
    return cu, int((ends - idx).max().item())


@register("attention", "flash", requirements=KernelSpec(
    "flash_attn", ("cuda",), HALF_DTYPES, ("none", "alibi"), auto_rank={"cuda": 0}, saves_scores=(),
))
class FlashAttention(Kernel):
    """flash-attn 2: ``flash_attn_func`` for one document per row, ``flash_attn_varlen_func`` with
    cu_seqlens from the segment ids for packed documents; ALiBi through its ``alibi_slopes``.

    CUDA and fp16/bf16 only. KV-cache decoding with padding (generation) goes to sdpa: varlen with cached
    keys would need per-row key lengths, and decoding is not where the time goes.
    """

    name = "flash"

    def prepare(self, inputs: AttentionInputs) -> Any:
        if inputs.offset or inputs.bias_kind == "dense":
            return ("sdpa", inputs.kernel_bias())
        if inputs.q_segments is None:
            return ("dense", None)
        return ("varlen", cu_seqlens_from_segments(inputs.q_segments))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, prepared: Any
    ) -> torch.Tensor:
        mode, extra = prepared
        if mode == "sdpa":
            return sdpa_attend(q, k, v, extra)
        check_runtime("flash", q)
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        slopes = None if inputs.slopes is None else inputs.slopes.float()
        b, h, s, d = q.shape
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [b, s, h, d]
        if mode == "dense":
            out = flash_attn_func(qt, kt, vt, causal=True, alibi_slopes=slopes)
        else:
            cu, longest = extra
            out = flash_attn_varlen_func(
                qt.reshape(b * s, h, d), kt.reshape(b * s, h, d), vt.reshape(b * s, h, d),
                cu, cu, longest, longest, causal=True, alibi_slopes=slopes,
            ).view(b, s, h, d)
        return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------- xformers

@register("attention", "xformers", requirements=KernelSpec(
    "xformers.ops", ("cuda",), None, ("none", "alibi"), auto_rank={"cuda": 2}, saves_scores=(),
))
class XFormersAttention(Kernel):
    """xformers' memory_efficient_attention: its own causal mask for RoPE, else the dense bias (ALiBi,
    segments) as attention bias. CUDA only."""

    name = "xformers"

    def prepare(self, inputs: AttentionInputs) -> Any:
        if inputs.offset:
            return ("sdpa", inputs.kernel_bias())
        bias = inputs.kernel_bias(align=8)  # once per forward, for every layer (not a [b, h, s, k] per layer)
        if bias is None:
            return ("causal", None)
        return ("bias", bias)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, prepared: Any
    ) -> torch.Tensor:
        mode, bias = prepared
        if mode == "sdpa":
            return sdpa_attend(q, k, v, bias)
        check_runtime("xformers", q)
        import xformers.ops as xops

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [b, s, h, d]
        if mode == "causal":
            attn_bias: Any = xops.LowerTriangularMask()
        else:
            b, h, s, _ = q.shape
            attn_bias = bias.expand(b, h, s, k.shape[2])  # a view: broadcast dimensions get stride 0
        return xops.memory_efficient_attention(qt, kt, vt, attn_bias=attn_bias).transpose(1, 2)
