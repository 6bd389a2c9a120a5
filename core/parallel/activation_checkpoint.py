"""Activation checkpointing from the config: none, every block, or the attention core only.

Uses the composable ``checkpoint`` API, which hooks a module in place, so parameter names (and so
checkpoints) are the same with and without recomputation.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from haina.core.model import blocks_of


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Returns how many modules were set to recompute."""
    if mode == "none":
        return 0
    targets = []
    for block in blocks_of(model):
        if mode == "full":
            targets.append(block)
        elif mode == "selective":
            # The attention core (softmax(QK^T)V) is the activation-heavy, FLOP-light part: recomputing it
            # saves the [heads, seq, seq] intermediates of the math kernel for little extra compute.
            targets.append(block.self_attn.kernel)
        else:
            raise ValueError(f"unknown activation_checkpoint mode {mode!r}")
    for module in targets:
        checkpoint(module)
    return len(targets)
