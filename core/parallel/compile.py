"""torch.compile per decoder block, from ``parallel.compile``.

Per block rather than the whole model: the blocks are identical, so one compiled graph (cached by code)
serves all of them, compile time does not grow with depth, and the pieces between blocks (embedding,
vocabulary-parallel loss, pipeline send/recv, FSDP's all-gathers) stay eager. The block's *forward*
is compiled in place, not the module wrapped, so parameter names (and so checkpoints) do not change, and
module hooks (FSDP2's, full activation checkpointing's) run outside the compiled graph.
"""

from __future__ import annotations

import torch
from torch import nn

from haina.core.model import blocks_of


def apply_compile(model: nn.Module) -> int:
    """Compile every block's forward in place; returns how many were compiled."""
    blocks = blocks_of(model)
    for block in blocks:
        if not getattr(block, "_haina_compiled", False):
            block.forward = torch.compile(block.forward)  # type: ignore[method-assign]
            block._haina_compiled = True
    return len(blocks)
