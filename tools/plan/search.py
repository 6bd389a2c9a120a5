"""Layouts of the same world that would fit: tensor, pipeline and sharded-data sizes and checkpointing.

The global batch, micro-batch, model and algorithm stay as configured; candidates are the layouts the
engine accepts (:func:`haina.core.parallel.mesh.resolve_layout`) with ``tp`` inside a node, pipeline
depths the batch can feed, full FSDP and HSDP with the shard group one node wide, and each checkpointing
mode. Under DeepSpeed (data parallel only) the candidates are the ZeRO stages and optimizer offload.
Listed smallest model-parallel degree first, then least recomputation, then least memory: the layouts
that usually run fastest among those that fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from haina.core.config import HainaConfig, build_config
from haina.core.errors import HainaError
from haina.core.overrides import apply_override
from haina.tools.plan.algorithms import ALIGNMENT
from haina.tools.plan.gpus import GIB, Target
from haina.tools.plan.memory import MemoryPlan, plan_memory

MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Candidate:
    overrides: tuple[str, ...]
    plan: MemoryPlan

    @property
    def needed_gib(self) -> float:
        return self.plan.needed_bytes / GIB

    def describe(self) -> str:
        return " ".join(o.removeprefix("parallel.").removeprefix("deepspeed.") for o in self.overrides)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(cfg: HainaConfig, nproc: int, algorithm: str, node: int) -> list[list[str]]:
    p, m = cfg.parallel, cfg.model
    if p.dp_backend == "deepspeed":
        out = []
        for stage in (1, 2, 3):
            for offload in (False, True):
                out.append([f"deepspeed.zero_stage={stage}", f"deepspeed.offload_optimizer={str(offload).lower()}",
                            "deepspeed.offload_params=false"])
        return out
    layouts = []
    for tp in [d for d in _divisors(nproc) if d <= node and m.num_heads % d == 0 and m.vocab_size % d == 0]:
        for pp in [d for d in _divisors(nproc // tp) if d <= m.num_layers and d <= 16]:
            if pp > 1 and algorithm in ALIGNMENT:
                continue
            dp = nproc // (tp * pp)
            shards = {dp} | ({node // tp} if dp > node // tp and dp % (node // tp) == 0 else set())
            for shard in sorted(shards, reverse=True):
                layouts.append([f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp_replicate={dp // shard}",
                                f"parallel.dp_shard={shard}", "parallel.pp_stage_layers=null",
                                "parallel.pp_schedule=1f1b" if pp == 1 or p.pp_schedule != "interleaved_1f1b"
                                else "parallel.pp_schedule=interleaved_1f1b"])
    return layouts


def alternatives(cfg: HainaConfig, nproc: int, target: Target, algorithm: str | None = None, *, top: int = 8,
                 node: int = 8, reserve_gib: float = 2.0, fragmentation: float = 0.05) -> list[Candidate]:
    """Up to ``top`` layouts of ``nproc`` ranks that fit ``target``, best first (see the module docstring)."""
    name = algorithm or cfg.algorithm
    base: dict[str, Any] = cfg.model_dump(mode="json")
    if base["train"]["global_batch_size"] is None:  # keep the configured step's batch fixed
        from haina.core.parallel.mesh import resolve_layout

        base["train"]["global_batch_size"] = resolve_layout(cfg, nproc).global_batch_size
    sp_free = name in ALIGNMENT
    found: list[Candidate] = []
    for layout in _layouts(cfg, nproc, name, node):
        for mode in MODES:
            overrides = [*layout, f"parallel.activation_checkpoint={mode}"]
            if sp_free:
                overrides.append("parallel.sequence_parallel=false")
            data = _copy(base)
            for o in overrides:
                apply_override(data, o)
            try:
                plan = plan_memory(build_config(data), nproc, target, name, reserve_gib, fragmentation)
            except HainaError:
                continue  # a layout the engine refuses (batch too small for the pipeline, ...)
            if plan.fits:
                found.append(Candidate(tuple(_shown(overrides)), plan))
    found.sort(key=lambda c: (c.plan.layout.tp * c.plan.layout.pp, MODES.index(_mode(c)), c.needed_gib))
    return found[:top]


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(data)


def _mode(c: Candidate) -> str:
    return next(o.split("=", 1)[1] for o in c.overrides if o.startswith("parallel.activation_checkpoint="))


def _shown(overrides: list[str]) -> list[str]:
    """The overrides worth printing (no nulls, no defaults of the field that carry no choice)."""
    hidden = ("parallel.pp_stage_layers=null", "deepspeed.offload_params=false", "parallel.pp_schedule=1f1b",
              "parallel.dp_replicate=1")
    return [o for o in overrides if o not in hidden]
