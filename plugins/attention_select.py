"""Which attention kernel runs: what each kernel needs (library, device, dtype, position bias), the checks
that turn a kernel named in the config into one clear line, and the ``auto`` kernel that picks the fastest
suitable one per forward and logs the choice once.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from haina.plugins.attention import BIAS_KINDS, HALF_DTYPES, AttentionInputs, Kernel, sdpa_attend
from haina.plugins.registry import PluginError, register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig

log = logging.getLogger("haina.attention")


# ------------------------------------------------------------------------------------ selection, auto

@dataclass(frozen=True)
class KernelSpec:
    """What a kernel can run: the library it needs, devices, dtypes (None = any) and position bias kinds."""

    module: str | None
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None
    bias_kinds: tuple[str, ...]


KERNELS: dict[str, KernelSpec] = {
    "flash": KernelSpec("flash_attn", ("cuda",), HALF_DTYPES, ("none", "alibi")),
    "flex": KernelSpec("torch.nn.attention.flex_attention", ("cuda", "cpu"), None, ("none", "alibi")),
    "xformers": KernelSpec("xformers.ops", ("cuda",), None, ("none", "alibi")),
    "sdpa": KernelSpec(None, ("cuda", "cpu", "mps", "xpu", "meta"), None, BIAS_KINDS),
}
# Fastest first, per device. flex on CPU is correct but unfused without a ~25 s compile per shape and has
# no backward there, so auto keeps CPU on sdpa.
PREFERENCE: dict[str, tuple[str, ...]] = {"cuda": ("flash", "flex", "xformers", "sdpa")}
DEFAULT_PREFERENCE: tuple[str, ...] = ("sdpa",)


@functools.cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken install (wrong CUDA build) counts as missing
        return False
    return True


def kernel_available(name: str) -> bool:
    """Whether the library behind kernel ``name`` imports here (tests monkeypatch this)."""
    spec = KERNELS[name]
    return spec.module is None or _importable(spec.module)


def position_bias_kind(position: str) -> str:
    """The ``bias_kind`` of the registered position plugin ``position`` ("dense" if it declares none)."""
    from haina.plugins import registry

    kind = getattr(registry.get("position", position), "bias_kind", "dense")
    return kind if kind in BIAS_KINDS else "dense"


def unsuitable(name: str, bias_kind: str, device: str | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Why kernel ``name`` cannot run this model here (one phrase), or None if it can."""
    spec = KERNELS[name]
    if not kernel_available(name):
        return f"needs {spec.module} (pip install {spec.module.split('.')[0].replace('_', '-')}), which is not installed"
    if bias_kind not in spec.bias_kinds:
        return f"does not take {bias_kind} position biases (supports: {', '.join(spec.bias_kinds)})"
    if device is not None and device not in spec.devices:
        return f"runs on {'/'.join(spec.devices)}, not {device}"
    if dtype is not None and spec.dtypes is not None and dtype not in spec.dtypes:
        return f"needs fp16/bf16, not {str(dtype).removeprefix('torch.')} (use train.precision=bf16)"
    return None


def select_kernel(bias_kind: str, device: str, dtype: torch.dtype) -> str:
    """The fastest installed kernel that takes this position bias on this device and dtype."""
    for name in PREFERENCE.get(device, DEFAULT_PREFERENCE):
        if unsuitable(name, bias_kind, device, dtype) is None:
            return name
    return "sdpa"


def check_kernel_config(name: str, position: str) -> None:
    """Config-time check of a kernel asked for by name: installed and able to take the position bias."""
    if name not in KERNELS:
        return  # auto, or a third-party kernel that checks itself
    why = unsuitable(name, position_bias_kind(position))
    if why is not None:
        raise ValueError(f"{name} {why}")


def check_runtime(name: str, q: torch.Tensor) -> None:
    """A kernel asked for by name on the wrong device or dtype: one line, not a CUDA traceback."""
    why = unsuitable(name, "none", q.device.type, q.dtype)
    if why is not None:
        raise PluginError(f"attention={name} {why}")


_logged: set[tuple[str, str, str, str]] = set()


def _announce(message: str) -> None:
    """INFO on the ``haina.attention`` logger; with no logging configured, one stderr line from rank 0."""
    log.info(message)
    if not logging.getLogger().hasHandlers() and os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


@register("attention", "auto")
class AutoAttention(Kernel):
    """Picks the kernel per forward from the device and compute dtype (:func:`select_kernel`); the choice
    is logged once. The chosen kernels hold no weights, so checkpoints do not depend on the choice."""

    name = "auto"

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__(cfg)
        self._kernels: dict[str, Kernel] = {}  # a plain dict: not submodules

    def kernel(self, name: str) -> Kernel:
        if name not in self._kernels:
            self._kernels[name] = registry_kernel(name)
        return self._kernels[name]

    def choose(self, inputs: AttentionInputs) -> str:
        # KV-cache decoding changes the key length every step, which would recompile flex each time and
        # sends flash/xformers to sdpa anyway: decoding takes sdpa.
        name = "sdpa" if inputs.offset else select_kernel(inputs.bias_kind, inputs.device.type, inputs.dtype)
        key = (name, inputs.bias_kind, inputs.device.type, str(inputs.dtype).removeprefix("torch."))
        if key not in _logged:
            _logged.add(key)
            _announce("attention: auto chose {} (position bias {}, {}, {})".format(*key))
        return name

    def prepare(self, inputs: AttentionInputs) -> tuple[str, Any]:
        name = self.choose(inputs)
        return name, self.kernel(name).prepare(inputs)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, prepared: Any
    ) -> torch.Tensor:
        name, sub = prepared
        if name != "sdpa" and unsuitable(name, inputs.bias_kind, q.device.type, q.dtype) is not None:
            # The compute dtype guessed before the blocks ran was wrong (e.g. no autocast): stay correct.
            return sdpa_attend(q, k, v, inputs.dense_bias())
        return self.kernel(name).attend(q, k, v, inputs, sub)


def registry_kernel(name: str) -> Kernel:
    from haina.plugins import registry

    return registry.get("attention", name)(None)
