"""Sharded data parallelism with FSDP2: ZeRO-3, ZeRO-2-like and HSDP, from one function.

Each block is its own FSDP unit (gathered just before it runs, freed after unless
``reshard_after_forward`` is off); the root unit holds embedding, final norm and head. Parameters stay
fp32 (the master copy); under bf16 they are gathered in bf16 for compute and gradients are reduced in
fp32, which is the recipe's "BF16 with FP32 where it matters".
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from haina.core.model import Transformer, blocks_of
from haina.core.parallel.mesh import Layout


def dp_mesh(mesh: DeviceMesh, layout: Layout) -> DeviceMesh | None:
    """The mesh FSDP2 shards over: 2-D (replicate, shard) for HSDP, 1-D otherwise; None without dp."""
    if layout.dp == 1:
        return None
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, *, bf16: bool, reshard_after_forward: bool, prefetch: int = 0
) -> None:
    """``prefetch`` > 0: each block issues the all-gathers of the next ``prefetch`` blocks of its own model
    (forward order) and of the ``prefetch`` before it (backward order) explicitly; 0 keeps FSDP2's own."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32, output_dtype=None
    )
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if prefetch > 0:
        models = [m for m in model.modules() if isinstance(m, Transformer)] or [model]
        for sub in models:
            _set_prefetch([b for b in blocks_of(sub) if isinstance(b, FSDPModule)], prefetch)
    # A wrapper of several models (PPO's actor and critic) calls each on its own, past the root's hooks:
    # every inner Transformer gets its own unit for its embedding, norm and head.
    for sub in model.modules():
        if sub is not model and isinstance(sub, Transformer):
            fully_shard(sub, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters (embedding, norm, head) are needed again right after the forward by the
    # loss and at the start of backward, so they are never freed in between.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def _set_prefetch(blocks: list[FSDPModule], n: int) -> None:
    """Explicit prefetching within one model's blocks: ``n`` ahead in forward, ``n`` behind in backward."""
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + n])
        block.set_modules_to_backward_prefetch(blocks[max(0, i - n) : i][::-1])
