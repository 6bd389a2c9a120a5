"""Normalization plugins (``norm`` kind): RMSNorm, as Baichuan 2 uses before every block and at the end.

Also home of :func:`autocast_off`, shared by the plugins that must do their math in fp32 under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.plugins.registry import register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Disable autocast on ``device`` so fp32 math stays fp32 (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@register("norm", "rmsnorm")
class RMSNorm(nn.Module):
    """x / rms(x) * weight over the hidden dimension, computed in fp32 (bf16 sums of squares lose precision)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))

    def reset_parameters(self) -> None:
        """Unit gain, so the norm starts as a pure rescaling."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device):
            out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)

    def tp_plan(self, sequence_parallel: bool) -> dict[str, Any]:
        """Per-token math: under SP it runs on this rank's sequence shard, else replicated."""
        from torch.distributed.tensor.parallel import SequenceParallel

        from haina.core.parallel.tensor_parallel import ReplicatedParallel

        return {"": SequenceParallel(use_local_output=True) if sequence_parallel else ReplicatedParallel()}

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
