"""Activation checkpointing from the config: none, every block, or the attention core only.

Uses the composable ``checkpoint`` API, which hooks a module in place, so parameter names (and so
checkpoints) are the same with and without recomputation.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import checkpoint as checkpoint_fn

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
        if mode == "full":
            checkpoint(module)  # hooks outside the block's forward, so a compiled forward stays one graph
        else:
            # Inside a block: the functional form, which torch.compile traces as one recompute region (the
            # composable hooks inside a compiled block replay the wrong tensors in backward).
            module.forward = functools.partial(checkpoint_fn, module.forward, use_reentrant=False)
    return len(targets)
