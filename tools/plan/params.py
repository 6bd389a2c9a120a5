"""Parameters per rank: how many each rank stores, and how many each FSDP unit gathers.

Why not a formula of hidden sizes: a third-party component declares its own parameters and TP plan. The
shapes come from a one-block model on the meta device (all blocks are alike), and the tensor-parallel
split of every parameter from the plans the components declare (:func:`collect_tp_plans`, the list
:func:`apply_tensor_parallel` applies), so the count follows the code that cuts the real model. FSDP2 then
shards every tensor-parallel shard on its first dimension over ``dp_shard``, each rank holding
``ceil(rows / dp_shard)`` rows (the padded shard it allocates); this is what ``haina.tools.simulate``
reports as a stage's largest local shard sum, and a test holds the two equal.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from haina.core.config import ModelConfig
from haina.core.parallel.mesh import Layout
from haina.core.parallel.pipeline import stage_indices, stage_layer_ranges

# (shape, tensor-parallel split dimension or None for replicated) of each parameter of a piece
Shapes = tuple[tuple[tuple[int, ...], int | None], ...]


@dataclass(frozen=True)
class ModelShapes:
    """The parameters of one model kind by piece: one block, the embedding, the final norm, the head."""

    block: Shapes
    embed: Shapes
    norm: Shapes
    head: Shapes
    replicated_unknown: tuple[str, ...] = ()  # parameters under a TP style the planner does not know

    def full(self, piece: str) -> int:
        return sum(math.prod(shape) for shape, _ in getattr(self, piece))


def _split_dims(model: nn.Module) -> tuple[dict[str, int | None], list[str]]:
    """Tensor-parallel split dimension of each parameter, read off the components' TP plans."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from haina.core.parallel.tensor_parallel import (
        PackedColwiseParallel,
        VocabParallelEmbedding,
        VocabParallelHead,
        collect_tp_plans,
    )

    dims: dict[str, int | None] = {}
    unknown: list[str] = []
    for name, module, style in collect_tp_plans(model, sequence_parallel=True):
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{name}.{p_name}" if name else p_name
            if isinstance(style, (PackedColwiseParallel, VocabParallelEmbedding, VocabParallelHead)):
                dims[full] = 0
            elif isinstance(style, ColwiseParallel):
                dims[full] = 1 if isinstance(module, nn.Embedding) else 0
            elif isinstance(style, RowwiseParallel):
                dims[full] = 0 if isinstance(module, nn.Embedding) else (1 if p_name == "weight" else None)
            else:
                dims.setdefault(full, None)
                if type(style).__name__ not in ("ReplicatedParallel", "SequenceParallel"):
                    unknown.append(full)
    return dims, unknown


def model_shapes(model: ModelConfig) -> ModelShapes:
    """Shapes and tp split dims of ``model``'s pieces (one meta block stands for all; cached by value)."""
    return _model_shapes(model.model_copy(update={"num_layers": 1}).model_dump_json())


@functools.cache
def _model_shapes(model_json: str) -> ModelShapes:
    from haina.core.model import Transformer

    with torch.device("meta"):
        one = Transformer(ModelConfig.model_validate_json(model_json))
    dims, unknown = _split_dims(one)
    pieces: dict[str, list[tuple[tuple[int, ...], int | None]]] = {"block": [], "embed": [], "norm": [], "head": []}
    for name, param in one.named_parameters():
        prefix = name.split(".", 1)[0]
        piece = {"layers": "block", "embed_tokens": "embed", "norm": "norm", "head": "head"}.get(prefix, "norm")
        pieces[piece].append((tuple(param.shape), dims.get(name)))
    return ModelShapes(**{k: tuple(v) for k, v in pieces.items()}, replicated_unknown=tuple(unknown))


def _local(shapes: Shapes, tp: int, dp_shard: int) -> tuple[int, int]:
    """(numel after tp, numel after tp and FSDP2's padded dim-0 shard) of a piece."""
    tp_numel = fsdp_numel = 0
    for shape, dim in shapes:
        local = list(shape)
        if dim is not None and tp > 1:
            local[dim] = math.ceil(local[dim] / tp)
        tp_numel += math.prod(local)
        if local and dp_shard > 1:
            local[0] = math.ceil(local[0] / dp_shard)
        fsdp_numel += math.prod(local)
    return tp_numel, fsdp_numel


@dataclass(frozen=True)
class Unit:
    """One FSDP unit on a rank: ``count`` alike pieces (blocks), or the root (embedding, norm, head)."""

    name: str
    count: int
    full: int  # parameters of one, before any sharding
    tp_local: int  # after tensor parallelism: what FSDP2 gathers for it
    local: int  # after tensor parallelism and FSDP2 sharding: what this rank stores


@dataclass(frozen=True)
class RankParams:
    """The parameters of one pipeline rank (all its virtual stages) of one model."""

    pp_rank: int
    blocks: int
    block: Unit
    root: Unit
    stages: tuple[tuple[int, ...], ...]  # the blocks of each of its stages

    @property
    def local(self) -> int:
        return self.blocks * self.block.local + self.root.local

    @property
    def tp_local(self) -> int:
        return self.blocks * self.block.tp_local + self.root.tp_local

    @property
    def full(self) -> int:
        return self.blocks * self.block.full + self.root.full


def stage_blocks(model: ModelConfig, layout: Layout, pp_rank: int, virtual: int,
                 counts: list[int] | None) -> tuple[tuple[int, ...], ...]:
    """The blocks of each stage pipeline rank ``pp_rank`` holds (the pipeline's own cut and placement)."""
    ranges = stage_layer_ranges(model.num_layers, layout.pp * virtual, counts)
    return tuple(tuple(ranges[i]) for i in stage_indices(pp_rank, layout.pp, virtual))


def rank_params(model: ModelConfig, layout: Layout, pp_rank: int = 0, virtual: int = 1,
                counts: list[int] | None = None, fsdp: bool = True) -> RankParams:
    """Parameters of ``model`` on pipeline rank ``pp_rank``; ``fsdp`` False: not sharded over data parallel
    (DeepSpeed shards its own way, or no data parallelism)."""
    shapes = model_shapes(model)
    stages = stage_blocks(model, layout, pp_rank, virtual, counts) if layout.pp > 1 else (tuple(range(model.num_layers)),)
    num_stages = layout.pp * virtual
    indices = stage_indices(pp_rank, layout.pp, virtual) if layout.pp > 1 else [0]
    first, last = 0 in indices, num_stages - 1 in indices
    shard = layout.dp_shard if fsdp and layout.dp > 1 else 1
    root_shapes: Shapes = (shapes.embed if first else ()) + ((shapes.norm + shapes.head) if last else ())
    block_tp, block_local = _local(shapes.block, layout.tp, shard)
    root_tp, root_local = _local(root_shapes, layout.tp, shard)
    blocks = sum(len(s) for s in stages)
    return RankParams(
        pp_rank, blocks, Unit("block", blocks, shapes.full("block"), block_tp, block_local),
        Unit("root", 1, sum(math.prod(s) for s, _ in root_shapes), root_tp, root_local), stages,
    )


def largest_param(model: ModelConfig, layout: Layout, fsdp: bool = True) -> int:
    """Numel of this rank's largest parameter shard (the optimizer's per-tensor temporaries)."""
    shapes = model_shapes(model)
    shard = layout.dp_shard if fsdp and layout.dp > 1 else 1
    return max(_local(((shape, dim),), layout.tp, shard)[1]
               for piece in (shapes.block, shapes.embed, shapes.norm, shapes.head) for shape, dim in piece)


def largest_full_tensor(model: ModelConfig, embed: bool = True, head: bool = True) -> int:
    """Numel of the largest parameter at full (unsharded) size that a stage holds (its blocks, with the
    embedding on the first stage, norm and head on the last): what materialising draws at once."""
    shapes = model_shapes(model)
    pieces = [shapes.block, *([shapes.embed] if embed else []), *([shapes.norm, shapes.head] if head else [])]
    return max(math.prod(shape) for piece in pieces for shape, _ in piece)


def total_parameters(model: ModelConfig) -> int:
    shapes = model_shapes(model)
    return model.num_layers * shapes.full("block") + shapes.full("embed") + shapes.full("norm") + shapes.full("head")
