"""Feed-forward plugins (``mlp`` kind): SwiGLU, Baichuan 2's MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from haina.core.registry import register

if TYPE_CHECKING:
    from haina.core.config import ModelConfig


@register("mlp", "swiglu")
class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) without biases; the width is cfg.ffn_size (11008 for 7B, 13696 for 13B).

    ``down_proj`` writes into the residual stream, so the model's init scales it down with depth.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def tp_plan(self, sequence_parallel: bool) -> dict[str, Any]:
        """Megatron's MLP split: gate/up by columns, down by rows, one reduction per MLP; under SP the
        input is gathered once for both column matmuls and the output reduce-scattered."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

        plan: dict[str, Any] = {
            "gate_proj": ColwiseParallel(),
            "up_proj": ColwiseParallel(),
            "down_proj": RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate()),
        }
        if sequence_parallel:
            plan[""] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )
        return plan
