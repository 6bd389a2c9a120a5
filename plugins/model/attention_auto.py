"""The ``auto`` attention kernel: picks the fastest suitable registered kernel per forward (from each
kernel's declared requirements, :func:`haina.core.attention.select_kernel`) and logs the choice once.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from haina.core.attention import (
    AttentionInputs,
    Kernel,
    KernelSpec,
    build_kernel,
    sdpa_attend,
    select_kernel,
    unsuitable,
)
from haina.core.registry import register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig

log = logging.getLogger("haina.attention")


# ------------------------------------------------------------------------------------ selection, auto

_logged: set[tuple[str, str, str, str]] = set()


def _announce(message: str) -> None:
    """INFO on the ``haina.attention`` logger; with no logging configured, one stderr line from rank 0."""
    log.info(message)
    if not logging.getLogger().hasHandlers() and os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


# Everything auto picks on CUDA is fused; on CPU it picks sdpa, whose math keeps the scores.
@register("attention", "auto", requirements=KernelSpec(saves_scores=("cpu", "mps", "xpu", "meta")))
class AutoAttention(Kernel):
    """Picks the kernel per forward from the device and compute dtype (:func:`select_kernel`); the choice
    is logged once. The chosen kernels hold no weights, so checkpoints do not depend on the choice."""

    name = "auto"

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__(cfg)
        self._kernels: dict[str, Kernel] = {}  # a plain dict: not submodules

    def kernel(self, name: str) -> Kernel:
        if name not in self._kernels:
            self._kernels[name] = build_kernel(name)
        return self._kernels[name]

    def choose(self, inputs: AttentionInputs) -> str:
        # KV-cache decoding changes the key length every step, which would recompile flex each time and
        # sends flash/xformers to sdpa anyway: decoding takes sdpa. Forwards without gradients (prefill,
        # evaluation, rollouts) come in a new width per batch, and compiled flex would recompile for each
        # (eager flex past the recompile limit materialises the scores): they skip flex too. Training
        # shapes are fixed, so there flex compiles once.
        exclude = () if torch.is_grad_enabled() else ("flex",)
        name = "sdpa" if inputs.offset else select_kernel(inputs.bias_kind, inputs.device.type, inputs.dtype, exclude)
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
