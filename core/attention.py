"""The attention-kernel contract: what the model hands a kernel, and what a kernel may require.

A kernel (kind ``attention``) does only the core product softmax(q k^T / sqrt(d) + bias) v, always causal.
What it must mask and bias arrives as one :class:`AttentionInputs` per forward (positions, packed-document
segment ids, this rank's ALiBi slopes, the KV-cache offset), not as a dense bias: sdpa wants a dense
[b, h, q, k] bias, flex a block mask and a score_mod, flash-attn cu_seqlens, and building the dense one for
them would cost the very memory they exist to save.

A kernel plugin subclasses :class:`Kernel`, is constructed as ``Plugin(cfg)`` and implements

- ``prepare(inputs) -> Any``: what it needs from the mask info; the model calls it once per forward,
  outside the (possibly compiled) blocks, and stores it in ``inputs.prepared``;
- ``attend(q, k, v, inputs, prepared) -> out``: q [b, h, q_len, d], k and v [b, h, k_len, d].

Its registration may declare a :class:`KernelSpec` (``requirements=``): the library, devices, dtypes and
position-bias kinds it supports. The checks below read that metadata for every kernel, built-in or not:
a kernel named in a config must be installed and take the position encoding's bias, and at run time the
device and dtype must fit, each refused in one line.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.core import registry
from haina.core.errors import PluginError
from haina.core.kv_cache import attention_mask

# What a position plugin asks of the kernel (its class attribute ``bias_kind``): "none" = nothing but the
# causal mask (RoPE), "alibi" = a per-head linear distance bias given by ``slopes``, "dense" = only an
# arbitrary dense bias from ``bias()`` (an unknown third-party plugin), which only sdpa can take.
BIAS_KINDS: tuple[str, ...] = ("none", "alibi", "dense")
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
ALL_DEVICES: tuple[str, ...] = ("cuda", "cpu", "mps", "xpu", "meta")


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

    def kernel_bias(self, align: int = 1) -> torch.Tensor | None:
        """:meth:`dense_bias` as a kernel takes it: [b or 1, h or 1, q, k] in the compute dtype, its rows
        padded in memory to a multiple of ``align`` elements (xformers wants 8). Built once per forward and
        shared by every layer, so backward saves one copy, not one cast per layer (13B ALiBi: 1.3 GB each)."""
        key = f"kernel/{align}"
        if key not in self._dense:
            bias = self.dense_bias()
            if bias is not None:
                bias = bias if bias.dim() == 4 else bias[None]
                k_len = bias.shape[-1]
                padded = -(-k_len // align) * align
                out = torch.empty((*bias.shape[:-1], padded), dtype=self.dtype, device=bias.device)[..., :k_len]
                bias = out.copy_(bias)
            self._dense[key] = bias
        return self._dense[key]

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

    def __init__(self, cfg: Any = None) -> None:  # the ModelConfig (kernels built by auto get None)
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


# ------------------------------------------------------------------------------------------- requirements

@dataclass(frozen=True)
class KernelSpec:
    """What a kernel can run: the library it needs, devices and dtypes (None = any), position bias kinds,
    and its place in ``auto``'s order per device (lower = tried first; None = never picked by auto).
    ``saves_scores``: the devices on which it keeps [heads, q, k] state for backward, the only case in
    which ``activation_checkpoint=selective`` (recomputing the kernel) saves memory; a kernel that does
    not say is assumed to keep it everywhere."""

    module: str | None = None
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    bias_kinds: tuple[str, ...] = BIAS_KINDS
    auto_rank: dict[str, int] | None = None
    saves_scores: tuple[str, ...] = ALL_DEVICES


ANY_KERNEL = KernelSpec()


def kernel_spec(name: str) -> KernelSpec:
    """The registered requirements of kernel ``name`` (none declared: runs anywhere, takes any bias)."""
    spec = registry.entry("attention", name).requirements
    return spec if isinstance(spec, KernelSpec) else ANY_KERNEL


@functools.cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken install (wrong CUDA build) counts as missing
        return False
    return True


def kernel_available(name: str) -> bool:
    """Whether the library behind kernel ``name`` imports here (tests monkeypatch this)."""
    spec = kernel_spec(name)
    return spec.module is None or _importable(spec.module)


def position_bias_kind(position: str) -> str:
    """The ``bias_kind`` of the registered position plugin ``position`` ("dense" if it declares none)."""
    kind = getattr(registry.get("position", position), "bias_kind", "dense")
    return kind if kind in BIAS_KINDS else "dense"


def unsuitable(name: str, bias_kind: str, device: str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Why kernel ``name`` cannot run this model here (one phrase), or None if it can."""
    spec = kernel_spec(name)
    if not kernel_available(name):
        assert spec.module is not None
        return f"needs {spec.module} (pip install {spec.module.split('.')[0].replace('_', '-')}), which is not installed"
    if bias_kind not in spec.bias_kinds:
        return f"does not take {bias_kind} position biases (supports: {', '.join(spec.bias_kinds)})"
    if device is not None and spec.devices is not None and device not in spec.devices:
        return f"runs on {'/'.join(spec.devices)}, not {device}"
    if dtype is not None and spec.dtypes is not None and dtype not in spec.dtypes:
        return f"needs fp16/bf16, not {str(dtype).removeprefix('torch.')} (use train.precision=bf16)"
    return None


def auto_order(device: str) -> list[str]:
    """Kernels ``auto`` tries on ``device``, fastest first (from each registration's ``auto_rank``)."""
    ranked = []
    for e in registry.entries("attention"):
        spec = e.requirements
        if isinstance(spec, KernelSpec) and spec.auto_rank is not None and device in spec.auto_rank:
            ranked.append((spec.auto_rank[device], e.name))
    return [name for _, name in sorted(ranked)]


def select_kernel(bias_kind: str, device: str, dtype: torch.dtype, exclude: tuple[str, ...] = ()) -> str:
    """The fastest installed kernel that takes this position bias on this device and dtype."""
    for name in auto_order(device):
        if name not in exclude and unsuitable(name, bias_kind, device, dtype) is None:
            return name
    return "sdpa"


def check_kernel_config(name: str, position: str) -> None:
    """Config-time check of a kernel asked for by name: installed and able to take the position bias."""
    why = unsuitable(name, position_bias_kind(position))
    if why is not None:
        raise ValueError(f"{name} {why}")


def check_runtime(name: str, q: torch.Tensor) -> None:
    """A kernel asked for by name on the wrong device or dtype: one line, not a CUDA traceback."""
    why = unsuitable(name, "none", q.device.type, q.dtype)
    if why is not None:
        raise PluginError(f"attention={name} {why}")


def build_kernel(name: str) -> Kernel:
    """A registered kernel built without a model config (``auto`` delegates to these)."""
    return registry.get("attention", name)(None)
