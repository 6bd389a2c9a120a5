"""The parallel layout: sizes resolved against the world size, checked, and turned into one DeviceMesh.

Mesh dimensions, outermost first: ``pp``, ``dp_replicate``, ``dp_shard``, ``tp`` — ``tp`` innermost so
consecutive ranks (one node's GPUs) form a tensor-parallel group, as in Baichuan 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from haina.core.config import ConfigError, HainaConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """Resolved sizes; ``grad_accum`` micro-batches per rank and step (the pipeline's microbatches)."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    grad_accum: int
    global_batch_size: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def describe(self) -> str:
        return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS)


def resolve_layout(cfg: HainaConfig, world_size: int) -> Layout:
    """Fill in ``dp_shard=-1`` and check that the layout can work, in one line per problem."""
    p, m = cfg.parallel, cfg.model
    if p.tp > 1 and p.compile and p.activation_checkpoint == "selective":
        # torch.compile traces the kernel's checkpoint region with DTensor inputs and saves their DeviceMesh
        # as if it were a tensor (AssertionError in backward): refused until torch supports it
        raise ConfigError(
            "parallel.activation_checkpoint: selective does not work with parallel.compile=true under tp>1 "
            "(torch.compile cannot save a tensor-parallel recompute region); use full or none, or compile=false"
        )
    fixed = p.tp * p.pp * p.dp_replicate
    if p.dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"parallel: tp*pp*dp_replicate = {fixed} does not divide the world size {world_size}"
            )
        dp_shard = world_size // fixed
    else:
        dp_shard = p.dp_shard
        if fixed * dp_shard != world_size:
            raise ConfigError(
                f"parallel: tp*pp*dp_replicate*dp_shard = {fixed * dp_shard} but the world size is {world_size}"
            )
    if m.num_heads % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} does not divide model.num_heads {m.num_heads}")
    if m.vocab_size % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} does not divide model.vocab_size {m.vocab_size}")
    if p.sequence_parallel and cfg.train.seq_len % p.tp:
        raise ConfigError(
            f"parallel.sequence_parallel: tp={p.tp} does not divide train.seq_len {cfg.train.seq_len}"
        )
    stages = p.pp * p.pp_virtual_stages
    if m.num_layers < stages:
        raise ConfigError(
            f"parallel: {stages} pipeline stages (pp x pp_virtual_stages) for only {m.num_layers} layers"
        )
    if p.pp > 1 and p.pp_schedule == "zero_bubble":
        raise ConfigError(
            "parallel.pp_schedule: zero_bubble splits backward into input and weight passes, which the "
            "chunked loss (gradients computed in forward) does not support; use 1f1b or interleaved_1f1b"
        )
    if p.pp_stage_layers is not None and (
        len(p.pp_stage_layers) != stages or sum(p.pp_stage_layers) != m.num_layers or min(p.pp_stage_layers) < 1
    ):
        raise ConfigError(
            f"parallel.pp_stage_layers: {p.pp_stage_layers} must be {stages} positive counts (pp x pp_virtual_stages) "
            f"summing to model.num_layers {m.num_layers}"
        )
    if p.pp_schedule == "interleaved_1f1b" and p.pp_virtual_stages < 2:
        raise ConfigError("parallel.pp_virtual_stages: interleaved_1f1b needs at least 2 stages per rank")
    dp = p.dp_replicate * dp_shard
    gbs = cfg.train.global_batch_size or cfg.train.micro_batch_size * dp
    per_step = cfg.train.micro_batch_size * dp
    if gbs % per_step:
        raise ConfigError(
            f"train.global_batch_size: {gbs} is not a multiple of micro_batch_size x data-parallel size = {per_step}"
        )
    grad_accum = gbs // per_step
    if p.pp > 1 and grad_accum < p.pp:
        raise ConfigError(
            f"train.global_batch_size: {grad_accum} pipeline microbatches per step is fewer than pp={p.pp}; "
            f"raise global_batch_size to at least {p.pp * per_step}"
        )
    return Layout(p.pp, p.dp_replicate, dp_shard, p.tp, grad_accum, gbs)


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    return init_device_mesh(
        device_type, (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp), mesh_dim_names=MESH_DIMS
    )
