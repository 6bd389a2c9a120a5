"""The one entry point that turns a single-device model part into a parallel one, and global clipping.

Order matters: tensor parallelism first (it replaces parameters by tp-sharded DTensors), then
activation checkpointing (hooks on modules), then torch.compile of each block's forward, then FSDP2 over
the data-parallel mesh (which composes with the tp DTensors into 2-D sharding; its hooks stay outside the
compiled forwards, as in torchtitan).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from haina.core import collectives
from haina.core.config import HainaConfig
from haina.core.parallel.activation_checkpoint import apply_activation_checkpointing
from haina.core.parallel.compile import apply_compile
from haina.core.parallel.data_parallel import apply_fsdp, dp_mesh
from haina.core.parallel.mesh import Layout
from haina.core.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(
    part: nn.Module, mesh: DeviceMesh, layout: Layout, cfg: HainaConfig, frozen: bool = False
) -> None:
    """Apply the layout to ``part`` in place; a ``frozen`` model (no backward) skips checkpointing."""
    if layout.tp > 1:
        apply_tensor_parallel(part, mesh["tp"], cfg.parallel.sequence_parallel)
    if not frozen:
        apply_activation_checkpointing(part, cfg.parallel.activation_checkpoint, cfg.model.attention, mesh.device_type)
    if cfg.parallel.compile:
        apply_compile(part)
    data_mesh = dp_mesh(mesh, layout)
    if data_mesh is not None:
        apply_fsdp(
            part, data_mesh, bf16=cfg.train.precision == "bf16",
            reshard_after_forward=cfg.parallel.reshard_after_forward, prefetch=cfg.parallel.fsdp_prefetch,
        )


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares over gradients that may be DTensors on different meshes (tp-only, 2-D, plain)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=False)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total = total + norm.float() ** 2
    return total


def clip_grad_norm(
    params: Iterable[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Global L2 norm over every rank's share of the model (reduced over pipeline stages), then clip."""
    params = [p for p in params if p.grad is not None]
    total = _squared_norm([p.grad for p in params])
    if pp_group is not None:
        collectives.all_reduce(total, group=pp_group)
    norm = total.sqrt()
    if params and math.isfinite(norm.item()):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
