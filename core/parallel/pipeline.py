"""Pipeline parallelism with torch.distributed.pipelining: stages cut from the layer list.

A stage is a copy of the whole model with the layers it does not own deleted, the embedding only on the
first stage and final norm + head only on the last. Parameter names stay those of the full model, so
DCP checkpoints move between pipeline and non-pipeline layouts. The model code knows nothing of this.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from haina.core.config import HainaConfig
from haina.core.parallel.mesh import Layout


def stage_layer_ranges(num_layers: int, num_stages: int, counts: list[int] | None = None) -> list[range]:
    """``counts`` blocks per stage when given (``parallel.pp_stage_layers``), else an even split; when
    uneven the earlier stages take one more layer, never the last (it has the head)."""
    if counts is not None:
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [range(s, s + c) for s, c in zip(starts, counts, strict=True)]
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra and stage < num_stages - 1 else 0)
        if stage == num_stages - 1:
            size = num_layers - start
        ranges.append(range(start, start + size))
        start += size
    return ranges


def stage_module(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A copy of ``model`` holding only ``layers`` (with their full-model names) and its ends.

    Only what the stage keeps is copied: the other blocks and ends are entered in deepcopy's memo as
    None, so a stage of a 13B model costs its own share, not a second whole model on the device."""
    dropped = [m for name, m in model.layers.items() if int(name) not in layers]
    if not first:
        dropped.append(model.embed_tokens)
    if not last:
        dropped += [model.norm, model.head]
    memo: dict[int, Any] = {id(m): None for m in dropped if m is not None}
    stage = copy.deepcopy(model, memo)
    for name in [n for n, m in stage.layers._modules.items() if m is None]:
        del stage.layers._modules[name]
    return stage


def stage_indices(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Loop placement: stage i lives on rank i % pp (what the interleaved schedules expect)."""
    return [pp_rank + v * pp for v in range(virtual)]


@dataclass
class StepResult:
    loss: float | None
    parts: dict[str, float] | None


@dataclass
class Pipeline:
    model_parts: list[nn.Module]
    schedule: Any
    has_first: bool
    has_last: bool
    _parts_seen: list[dict[str, float]] = field(default_factory=list)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Forward and backward over all microbatches of one optimizer step (grads averaged over them)."""
        self._parts_seen.clear()
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.has_first else ()
        kwargs: dict[str, Any] = {"target": labels, "losses": losses} if self.has_last else {}
        self.schedule.step(*args, **kwargs)
        if not self.has_last:
            return StepResult(None, None)
        n = len(losses)
        parts = {k: sum(p[k] for p in self._parts_seen) / n for k in self._parts_seen[0]}
        return StepResult(sum(float(x.detach()) for x in losses) / n, parts)


def build_pipeline(
    model: nn.Module, pp_mesh: DeviceMesh, cfg: HainaConfig, layout: Layout, algorithm: Any, device: torch.device
) -> Pipeline:
    pcfg = cfg.parallel
    virtual = pcfg.pp_virtual_stages if pcfg.pp_schedule == "interleaved_1f1b" else 1
    num_stages = layout.pp * virtual
    ranges = stage_layer_ranges(cfg.model.num_layers, num_stages, pcfg.pp_stage_layers)
    pp_rank = pp_mesh.get_local_rank()
    group = pp_mesh.get_group()
    parts: list[nn.Module] = []
    stages: list[PipelineStage] = []
    pipeline = Pipeline(model_parts=parts, schedule=None, has_first=False, has_last=False)
    for index in stage_indices(pp_rank, layout.pp, virtual):
        first, last = index == 0, index == num_stages - 1
        module = stage_module(model, ranges[index], first, last)
        parts.append(module)
        stages.append(PipelineStage(module, index, num_stages, device, group=group))
        pipeline.has_first |= first
        pipeline.has_last |= last
    last_module = parts[-1]

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = algorithm.loss_from_hidden(last_module, output, target)
        pipeline._parts_seen.append({k: float(v) for k, v in out.parts.items()})
        return out.loss

    microbatches = layout.grad_accum
    if virtual > 1:
        pipeline.schedule = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn)
    else:
        pipeline.schedule = Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn)
    return pipeline
