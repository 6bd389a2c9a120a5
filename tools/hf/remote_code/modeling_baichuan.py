"""The Baichuan 2 model layout for ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

Shipped by ``haina export hf --format baichuan`` beside the weights; imports only torch, transformers and the
standard library, so it runs without haina. Weight names are the release's: ``model.embed_tokens``,
``model.layers.N.self_attn.W_pack`` ([Q; K; V] stacked, [3 * hidden, hidden]), ``o_proj``,
``mlp.gate_proj/up_proj/down_proj`` (SwiGLU), ``input_layernorm`` / ``post_attention_layernorm`` (RMSNorm),
``model.norm`` and ``lm_head`` (NormHead: its rows are normalized to unit length when logits are computed,
so the raw trained matrix is what the file stores).

``config.position_embedding`` picks RoPE (Baichuan 2 7B: rotate-half layout, base ``rope_theta``, applied to
q and k) or ALiBi (13B: the ALiBi paper's per-head slopes, including its rule for head counts that are not a
power of two, added as ``slope * (key - query)`` distance to the scores). All position math is fp32.

Generation uses transformers' own ``Cache`` objects (a ``DynamicCache`` by default) through ``cache.update``,
so ``model.generate`` works with greedy, sampling and beam search, with left-padded batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_baichuan import BaichuanConfig

# transformers 5 renamed the outputs' ``past_key_values`` to ``cache``; write the name this version declares.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ------------------------------------------------------------------------------------------- positions

def alibi_slopes(num_heads: int) -> torch.Tensor:
    """fp32 [num_heads] ALiBi slopes.

    With n a power of two, head i (from 0) gets 2^(-8 (i + 1) / n). Otherwise the heads take the slopes of
    the largest power of two c below n, followed by the odd-numbered slopes of the 2c series (the 1st, 3rd,
    5th ...), as many as are missing; e.g. 40 heads: 2^(-(i + 1) / 4) for i < 32, then 2^(-(2j + 1) / 8).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    base = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(base)
    if base < num_heads:
        slopes += geometric(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [batch, 1, seq, head_dim] for positions [batch, seq]: angle p * theta^(-2i / d),
    each frequency used for both halves of the head (the rotate-half layout)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] pairwise (i, i + d/2) by the angles, in fp32."""
    xf = x.to(torch.float32)
    first, second = xf.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def attention_bias(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past: int,
    slopes: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """fp32 additive bias [batch, heads or 1, q_len, past + q_len]: -inf where a query may not look.

    Causal by slot, and padding keys (0 in the 2D ``attention_mask``) are hidden. A padding query keeps its
    own slot so that no row is empty (an all -inf row would make NaNs that leak through the values). ALiBi
    distances are slot differences: within one row the tokens a query sees are contiguous, so the slot
    distance is the position distance even when the row is left-padded.
    """
    k_len = past + q_len
    q_slot = torch.arange(past, k_len, device=device)[:, None]
    k_slot = torch.arange(k_len, device=device)[None, :]
    allowed = (k_slot <= q_slot)[None]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != k_len:
            raise ValueError(
                f"attention_mask must be 2D [batch, {k_len}] (cached and new tokens), "
                f"got {tuple(attention_mask.shape)}"
            )
        allowed = (allowed & attention_mask.to(torch.bool)[:, None, :]) | (k_slot == q_slot)[None]
    allowed = allowed.expand(batch, q_len, k_len)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(~allowed, float("-inf"))
    bias = bias[:, None]
    if slopes is not None:
        bias = bias + slopes.to(device)[:, None, None] * (k_slot - q_slot).to(torch.float32)
    return bias


# ------------------------------------------------------------------------------------------- modules

class BaichuanRMSNorm(nn.Module):
    """x / rms(x) * weight over the hidden dimension, computed in fp32 and cast back."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.to(torch.float32), (x.shape[-1],), self.weight.to(torch.float32), self.eps)
        return out.to(x.dtype)


class BaichuanMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAttention(nn.Module):
    """Multi-head self-attention with the fused [Q; K; V] projection ``W_pack``."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.W_pack(x).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, s, head_dim]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class BaichuanLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)), out = h + mlp(norm(h))."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = BaichuanMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), bias, rope, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class NormHead(nn.Linear):
    """Baichuan 2's output head: logits = h @ normalize(W, rows)^T. The normalization is redone on every
    call (cheap next to the matmul), so fine-tuning the raw weight keeps the head's meaning."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, F.normalize(self.weight, dim=1))


# ------------------------------------------------------------------------------------------- models

class BaichuanPreTrainedModel(PreTrainedModel):
    """Shared loading settings; weights initialise with transformers' defaults (normal(0, initializer_range)
    for linear and embedding weights, ones for the RMSNorm gains)."""

    config_class = BaichuanConfig
    base_model_prefix = "model"
    _no_split_modules = ["BaichuanLayer"]
    supports_gradient_checkpointing = False
    _supports_cache_class = True  # transformers 4.x: lets generate pass a Cache object rather than tuples


class BaichuanModel(BaichuanPreTrainedModel):
    """Embedding, decoder layers and final norm; returns the final-normed hidden states."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r}: the Baichuan MLP is SwiGLU (silu)")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BaichuanLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BaichuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``position_ids`` [batch, seq] default to the slots after the cached ones (RoPE reads them; ALiBi
        needs only distances). ``cache`` is a transformers ``Cache``; with ``use_cache`` and none given, a
        ``DynamicCache`` is started and returned."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions: scaled_dot_product_attention returns no attention weights")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=h.device)
        position_ids = position_ids.reshape(-1, s).expand(b, s)
        alibi = self.config.position_embedding == "alibi"
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rope = None if alibi else rope_cos_sin(position_ids, head_dim, self.config.rope_theta)
        slopes = alibi_slopes(self.config.num_attention_heads) if alibi else None
        bias = attention_bias(attention_mask, b, s, past, slopes, h.device)
        hidden_states: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(h)
            h = layer(h, bias, rope, cache)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            **{_CACHE_FIELD: cache},
        )


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    """BaichuanModel plus the NormHead; ``labels`` give the mean next-token cross-entropy."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> NormHead:
        return self.lm_head

    def set_output_embeddings(self, value: NormHead) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """``past_key_values`` is the pre-5.0 name of ``cache``. ``logits_to_keep`` > 0 computes logits
        for only the last that many positions (what ``generate`` asks for); a tensor picks positions."""
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as cache or as past_key_values, not both")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        h = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].to(torch.float32).reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        if return_dict is False:
            return result.to_tuple()
        return result
