"""A layout of a real run simulated without GPUs: torch's fake process group at the full world size and
meta tensors, through haina's own layout code (pipeline cut, tensor parallel, FSDP2).

    python -m haina.tools.simulate --config baichuan2-13b --world 1024 parallel.tp=8 parallel.pp=4

For each pipeline stage (one rank of it is simulated; the others of the stage differ only in coordinates)
it reports the blocks, whether the embedding and head live there, the stage's parameters, and every
parameter's local shard for every (dp_shard, tp) coordinate, computed from its DTensor placements: their
sum must be the parameter, and the stages' parameters together the model. The vocabulary-parallel head is
checked on a tp-only copy of the last stage: each tp rank's rows and their offsets. Nothing is allocated,
so a 13B model on 1,024 ranks takes about a second.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from haina.core.algorithm import algorithm_class
from haina.core.config import HainaConfig, load_config
from haina.core.loss import vocab_shard_of
from haina.core.model import Transformer, count_parameters
from haina.core.parallel.mesh import MESH_DIMS, Layout, build_mesh, resolve_layout
from haina.core.parallel.tensor_parallel import apply_tensor_parallel
from haina.core.placement import lay_out


def _fake_world(rank: int, world: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def _rank_of(layout: Layout, **coords: int) -> int:
    """Global rank of mesh coordinates (the mesh is laid out in MESH_DIMS order, tp innermost)."""
    rank = 0
    for dim in MESH_DIMS:
        rank = rank * getattr(layout, dim) + coords.get(dim, 0)
    return rank


def _shards_cover(param: torch.Tensor) -> tuple[bool, list[int]]:
    """Whether the local shards over every mesh coordinate that splits ``param`` add up to it; the
    distinct local numels seen."""
    if not isinstance(param, DTensor):
        return True, [param.numel()]
    return _cover(tuple(param.shape), tuple(param.device_mesh.shape), tuple(param.placements))


@functools.cache
def _cover(global_shape: tuple[int, ...], shape: tuple[int, ...], placements: tuple[Any, ...]) -> tuple[bool, list[int]]:
    """:func:`_shards_cover` by (shape, mesh, placements): the blocks' parameters repeat them 40 times."""
    split = [i for i, p in enumerate(placements) if not p.is_replicate()]  # Shard, and FSDP-over-tp's _StridedShard
    total, seen = 0, set()
    for coords in itertools.product(*(range(shape[i]) for i in split)):
        coordinate = [0] * len(shape)
        for i, c in zip(split, coords, strict=True):
            coordinate[i] = c
        local, _ = _compute_local_shape_and_global_offset(global_shape, shape, coordinate, placements)
        n = int(torch.Size(local).numel())
        total += n
        seen.add(n)
    return total == math.prod(global_shape), sorted(seen)


def simulate(cfg: HainaConfig, world: int) -> dict[str, Any]:
    """The per-stage report of ``cfg``'s layout on ``world`` fake ranks (see the module docstring)."""
    layout = resolve_layout(cfg, world)
    with torch.device("meta"):
        full = Transformer(cfg.model)
    full_names = {n: p.numel() for n, p in full.named_parameters()}
    stages: list[dict[str, Any]] = []
    seen_names: dict[str, int] = {}
    for pp_rank in range(layout.pp):
        _fake_world(_rank_of(layout, pp=pp_rank), world)
        mesh = build_mesh(layout, "cpu")
        with torch.device("meta"):
            model = Transformer(cfg.model)
        parts, _ = lay_out(model, cfg, layout, mesh, torch.device("meta"), stage_loss=algorithm_class(cfg)(cfg))
        for part in parts:
            covered = True
            local = 0
            for name, p in part.named_parameters():
                ok, sizes = _shards_cover(p)
                covered &= ok
                local += max(sizes)
                seen_names[name] = seen_names.get(name, 0) + 1
            stages.append({
                "pp_rank": pp_rank, "blocks": [int(k) for k in part.layers],
                "embedding": part.embed_tokens is not None, "head": part.head is not None,
                "parameters": count_parameters(part), "largest_local_shard_sum": local, "shards_cover": covered,
            })
    vocab = _vocab_parallel_rows(cfg, layout, world)
    dist.destroy_process_group()
    return {
        "layout": layout.describe(), "world": world, "model_parameters": sum(full_names.values()),
        "stages": stages, "every_parameter_once": seen_names == dict.fromkeys(full_names, 1),
        "stage_parameters_sum": sum(s["parameters"] for s in stages), "vocab_parallel": vocab,
    }


def _vocab_parallel_rows(cfg: HainaConfig, layout: Layout, world: int) -> list[tuple[int, int]]:
    """(local rows, first row) of the head weight on each tp rank, as the vocabulary-parallel loss sees it."""
    rows = []
    one_block = cfg.model.model_copy(update={"num_layers": 1})  # the head's split does not depend on depth
    for tp_rank in range(layout.tp):
        _fake_world(_rank_of(layout, tp=tp_rank), world)
        mesh = build_mesh(layout, "cpu")
        with torch.device("meta"):
            model = Transformer(one_block)
        if layout.tp > 1:
            apply_tensor_parallel(model, mesh["tp"], cfg.parallel.sequence_parallel)
        local, shard = vocab_shard_of(model.head.weight)
        rows.append((int(local.shape[0]), 0 if shard is None else int(shard.start)))
    return rows


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['layout']} on {report['world']} ranks: {report['model_parameters'] / 1e9:.2f}B parameters"]
    lines.append(f"{'stage':>5} {'blocks':>9} {'emb':>4} {'head':>5} {'params (B)':>11} {'per rank (M)':>13}  shards")
    for s in report["stages"]:
        blocks = f"{s['blocks'][0]}-{s['blocks'][-1]}"
        lines.append(f"{s['pp_rank']:>5} {blocks:>9} {'yes' if s['embedding'] else '':>4} {'yes' if s['head'] else '':>5} "
                     f"{s['parameters'] / 1e9:>11.3f} {s['largest_local_shard_sum'] / 1e6:>13.2f}  "
                     f"{'cover' if s['shards_cover'] else 'GAP'}")
    lines.append(f"vocabulary-parallel head rows per tp rank (rows, first): {report['vocab_parallel']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="baichuan2-13b")
    parser.add_argument("--world", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    report = simulate(load_config(args.config, args.overrides), args.world)
    print(json.dumps(report) if args.json else format_report(report))
    return report


if __name__ == "__main__":
    main()
