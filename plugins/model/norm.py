"""Normalization plugins (``norm`` kind): RMSNorm, as Baichuan 2 uses before every block and at the end.

Also home of :func:`autocast_off`, shared by the plugins that must do their math in fp32 under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.registry import PluginError, register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Disable autocast on ``device`` so fp32 math stays fp32 (a no-op where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@functools.cache
def apex_available() -> bool:
    """apex with its fused RMSNorm CUDA extension (a broken or CPU-only build counts as absent)."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # noqa: F401
    except Exception:
        return False
    return True


def apex_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return fused_rms_norm_affine(x, weight, (x.shape[-1],), eps)


def _use_apex(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # DTensor weights (sequence parallel) must go through torch, which knows to reduce their gradients.
    if not (x.is_cuda and apex_available()):
        return False
    from torch.distributed.tensor import DTensor  # ~0.4 s to import: only asked on CUDA with apex

    return not isinstance(weight, DTensor)


@register("norm", "rmsnorm")
class RMSNorm(nn.Module):
    """x / rms(x) * weight over the hidden dimension, computed in fp32 (bf16 sums of squares lose precision).

    On CUDA with apex installed the same math runs in apex's fused kernel (FusedRMSNorm's function);
    otherwise torch's ``rms_norm``. The parameter is ``weight`` either way, so checkpoints do not care.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps, self.hidden_size = cfg.norm_eps, cfg.hidden_size  # the size as built (ZeRO-3 empties weight)
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))

    def reset_parameters(self) -> None:
        """Unit gain, so the norm starts as a pure rescaling."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device):
            if _use_apex(x, self.weight):
                out = apex_rms_norm(x.float(), self.weight.float(), self.eps)
            else:
                out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)

    def tp_plan(self, sequence_parallel: bool) -> dict[str, Any]:
        """Per-token math: under SP it runs on this rank's sequence shard, else replicated."""
        from torch.distributed.tensor.parallel import SequenceParallel

        from haina.core.parallel.tensor_parallel import ReplicatedParallel  # DTensor: only under tp

        return {"": SequenceParallel(use_local_output=True) if sequence_parallel else ReplicatedParallel()}

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


@register("norm", "apex")
class ApexRMSNorm(RMSNorm):
    """RMSNorm that insists on apex's fused kernel: fails at construction, in one line, without apex."""

    def __init__(self, cfg: ModelConfig) -> None:
        if not apex_available():
            raise PluginError("norm=apex needs NVIDIA apex built with its CUDA extensions, which is not installed")
        super().__init__(cfg)
