"""Activation checkpointing from the config: none, every block, or the attention core only.

Uses the composable ``checkpoint`` API, which hooks a module in place, so parameter names (and so
checkpoints) are the same with and without recomputation.
"""

from __future__ import annotations

import functools
import logging

from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import checkpoint as checkpoint_fn

from haina.core.attention import kernel_spec
from haina.core.model import blocks_of

log = logging.getLogger("haina.parallel")


def apply_activation_checkpointing(model: nn.Module, mode: str, kernel: str = "sdpa", device_type: str = "cpu") -> int:
    """Returns how many modules were set to recompute. ``selective`` recomputes the attention kernel only
    where it keeps [heads, seq, seq] state for backward (its ``saves_scores``): flash, xformers and the
    fused CUDA kernels keep none, and recomputing them would cost an attention forward for nothing."""
    if mode == "none":
        return 0
    if mode == "selective" and device_type not in kernel_spec(kernel).saves_scores:
        log.warning(
            "activation_checkpoint=selective: attention=%s keeps no [heads, seq, seq] state on %s; nothing "
            "recomputed (activation_checkpoint=full saves the rest)", kernel, device_type,
        )
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
