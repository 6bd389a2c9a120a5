"""The Baichuan 2-style decoder, assembled from plugins named in :class:`ModelConfig`.

Parameter names follow the released Baichuan 2 checkpoints (``embed_tokens``, ``layers.N.self_attn.W_pack``,
``o_proj``, ``mlp.gate_proj`` ...), so weights map one to one. :meth:`Transformer.forward` returns the final
hidden states, not logits: the loss multiplies them with ``head.effective_weight()`` in chunks so the
[tokens, 125,696] logits never exist whole.

Models are built on the meta device, cut by the layout there, and only each rank's shards are
materialised and initialised (:mod:`haina.core.materialize`; the rule per module is
:meth:`Transformer.init_module`, derived buffers such as the ALiBi slopes come from ``reset_parameters``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from haina.core import registry
from haina.core.attention import AttentionInputs
from haina.core.config import HainaConfig, ModelConfig
from haina.core.errors import PluginError
from haina.core.kv_cache import KVCache, LayerCache
from haina.core.materialize import build, init_weights

# Where models are built: the layout cuts them there and only each rank's shards are materialised.
META = torch.device("meta")

# Linear layers that write into the residual stream; their init is scaled down with depth.
RESIDUAL_OUTPUTS: tuple[str, ...] = ("o_proj", "down_proj")


def build_plugin(kind: str, name: str, cfg: ModelConfig) -> nn.Module:
    """Construct the registered ``kind`` plugin ``name``: ``Plugin(cfg)``, or ``Plugin(cfg, settings)`` when
    it declares settings (its ``model.<name>`` section)."""
    entry = registry.entry(kind, name)
    module = entry.obj(cfg, cfg.settings_of(name)) if entry.settings is not None else entry.obj(cfg)
    if not isinstance(module, nn.Module):
        raise PluginError(f"{kind} plugin {name!r} built a {type(module).__name__}, not an nn.Module")
    return module


class Attention(nn.Module):
    """Multi-head self-attention: packed QKV projection, position plugin, kernel plugin, output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.hidden_size = cfg.hidden_size
        # Q;K;V stacked in that order along the output dimension, as in the released checkpoints.
        self.W_pack = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.kernel = build_plugin("attention", cfg.attention, cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionInputs,
        position: nn.Module,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x [b, s, hidden] -> [b, s, hidden]; ``position`` is the model's shared position plugin and
        ``attn`` the mask info of this forward, already prepared for the kernel.

        With ``cache`` the keys/values of earlier positions come from it and this call's are appended.
        """
        # Head count from the projection's width, not the config: under tensor parallelism W_pack yields
        # only this rank's heads (Q_r;K_r;V_r) and o_proj takes only their outputs.
        qkv = self.W_pack(x)
        b, s, _ = qkv.shape
        q, k, v = qkv.view(b, s, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [b, heads, s, d]
        q, k = position(q, k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        # Built-in kernels take the structured mask info; a third-party kernel of the older interface gets
        # the dense additive bias (None = plain causal).
        out = self.kernel(q, k, v, attn if getattr(self.kernel, "takes_inputs", False) else attn.dense_bias())
        return self.o_proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = build_plugin("norm", cfg.norm, cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = build_plugin("norm", cfg.norm, cfg)
        self.mlp = build_plugin("mlp", cfg.mlp, cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionInputs,
        position: nn.Module,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), positions, attn, position, cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Embedding, ``num_layers`` blocks, final norm, and an (untied) output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # One position module for all layers: it owns the (derived) RoPE/ALiBi state, and the bias is
        # built once per forward rather than once per layer. Blocks receive it as an argument.
        self.position = build_plugin("position", cfg.position, cfg)
        # A dict keyed "0".."L-1" rather than a list: a pipeline stage deletes the layers it does not own
        # and the survivors keep their names (layers.N...), so checkpoints reshard across layouts.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.norm = build_plugin("norm", cfg.norm, cfg)
        self.head = build_plugin("head", cfg.head, cfg)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        segments: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits: slice | None = None,
    ) -> torch.Tensor:
        """tokens [b, s] -> final-normed hidden states [b, s, hidden], or with ``logits`` the head's logits
        of those positions (e.g. ``slice(-1, None)`` for decoding) inside the same forward.

        ``positions`` [s] or [b, s] default to 0..s-1 (after the cached ones). ``segments`` [b, s] pack
        several documents in a row (1, 2, ...; 0 = padding): attention stays inside a segment. ``cache``
        holds earlier positions' keys/values (incremental decoding). A pipeline stage without the
        embedding takes hidden states [b, s, hidden] instead of tokens, and one without the final norm
        returns its last block's output.
        """
        s = tokens.shape[1]
        start = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(start, start + s, device=tokens.device)
        attn = self.attention_inputs(tokens, positions, segments, cache)
        kernel = self._kernel()
        if kernel is not None and getattr(kernel, "takes_inputs", False):
            # Once per forward, outside the blocks (which may be compiled): mask, bias, cu_seqlens ...
            attn.prepared = kernel.prepare(attn)
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        for name, layer in self.layers.items():
            h = layer(h, positions, attn, self.position, cache=None if cache is None else cache.layer(name))
        if cache is not None:
            assert attn.q_segments is not None
            cache.commit(attn.q_positions, attn.q_segments)
        h = self.norm(h) if self.norm is not None else h
        return h if logits is None else self.head(h[:, logits])

    def _kernel(self) -> nn.Module | None:
        for layer in self.layers.values():
            return layer.self_attn.kernel
        return None

    def attention_inputs(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor | None,
        cache: KVCache | None,
    ) -> AttentionInputs:
        """The mask info of this forward: positions, segment ids (also of cached keys), this rank's ALiBi
        slopes, and the compute dtype (autocast's, else the weights') the kernels will see."""
        b, s = tokens.shape[0], tokens.shape[1]
        device = tokens.device
        if segments is None and cache is None:
            q_pos = k_pos = positions
            q_seg = k_seg = None
        else:
            q_pos = positions.expand(b, s)
            q_seg = torch.ones_like(q_pos) if segments is None else segments
            k_pos, k_seg = (q_pos, q_seg) if cache is None else cache.keys_of(q_pos, q_seg)
        if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = next((p.dtype for p in self.layers.parameters() if p.is_floating_point()), torch.float32)
        bias_kind = getattr(self.position, "bias_kind", "dense")
        return AttentionInputs(
            q_pos, k_pos, q_seg, k_seg, b, s, k_pos.shape[-1], device, dtype,
            bias_kind=bias_kind,
            slopes=getattr(self.position, "slopes", None) if bias_kind == "alibi" else None,
            bias_fn=self.position.bias,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [b, s, vocab]; for tests and generation (training uses the chunked loss)."""
        return self.head(hidden)

    def init_module(self, name: str, module: nn.Module) -> bool:
        """Initialise one of this model's modules (``name`` relative to the model) in place from the current
        RNG; False leaves it to the module's own ``reset_parameters`` (norms -> ones, heads, ALiBi slopes).

        Linear and embedding weights ~ normal(0, init_std). The residual-output projections (o_proj,
        down_proj) get std / sqrt(2 * num_layers): the stream is a sum of 2 * num_layers branch outputs, so
        this keeps its variance at init independent of depth (the GPT-2 / Megatron scaled init).
        :func:`haina.core.materialize.init_weights` calls this once per module with that module's own
        seed and full-size tensors, so the values do not depend on the layout.
        """
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        std = self.cfg.init_std
        leaf = name.rsplit(".", 1)[-1]
        module.weight.normal_(0.0, std / math.sqrt(2 * self.cfg.num_layers) if leaf in RESIDUAL_OUTPUTS else std)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
        return True

    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every weight: from ``seed``, or from a seed drawn from the current torch RNG (so the
        caller's ``torch.manual_seed`` decides); the same values as any parallel layout of this model gets."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        init_weights(self, seed)


def build_model(cfg: HainaConfig, device: torch.device) -> Transformer:
    """The Transformer of ``cfg.model`` on the meta device, or materialised on ``device`` with fp32
    parameters initialised from ``cfg.train.seed`` (the master copy; bf16 lives in autocast).

    The training loop and every tool build on meta, cut the model by the layout, and materialise only
    this rank's shards (:func:`haina.core.materialize.materialize`), with the same values."""
    return build(lambda: Transformer(cfg.model), device, cfg.train.seed)


def blocks_of(model: nn.Module) -> list[Block]:
    """Every decoder block inside ``model`` (one Transformer, a pipeline stage, or several models in a
    wrapper such as PPO's actor and critic): the units of FSDP sharding and activation checkpointing."""
    return [m for m in model.modules() if isinstance(m, Block)]


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())
