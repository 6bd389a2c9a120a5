"""Laying a model out on the world, one way for training and inference.

:func:`lay_out` cuts a whole model for a resolved layout: pipeline stages when ``pp > 1`` (the last
stage runs ``stage_loss``), then tensor parallel, activation checkpointing, compilation and FSDP per
part (:func:`~haina.core.parallel.parallelize.parallelize`). Training calls it and builds an optimizer
per part; inference calls it with ``frozen=True`` through :func:`place`.

For inference the layout comes from ``parallel.*`` overrides on the model's own config (and
``train.precision``, fp32 unless asked; :func:`inference_config`); the world size comes from torchrun.
The model is built on the meta device and cut here; only this rank's shards are then read from the
source (:func:`haina.core.model_loading.open_model`: any checkpoint layout, or an HF directory, fills any). Tools deal their work out by ``dp_rank`` and count results once per tensor-parallel group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from haina.core.config import ConfigError, HainaConfig, build_config
from haina.core.distributed import default_device
from haina.core.materialize import materialize
from haina.core.model import META, build_model
from haina.core.model_loading import ModelSource
from haina.core.overrides import apply_override
from haina.core.parallel.mesh import Layout, build_mesh, resolve_layout
from haina.core.parallel.parallelize import parallelize
from haina.core.parallel.pipeline import build_pipeline

OVERRIDE_PREFIXES = ("parallel.", "train.precision=")


def lay_out(
    model: nn.Module, cfg: HainaConfig, layout: Layout, mesh: Any, device: torch.device, *,
    stage_loss: Any = None, frozen: bool = False, initialise: bool = True,
) -> tuple[list[nn.Module], Any]:
    """(this rank's model parts, the pipeline or None) of ``model`` under ``layout``, on ``device``.

    ``model`` is on the meta device (:func:`haina.core.model.build_model` with ``meta``): it is cut there
    and each part's shards are then materialised on ``device``, initialised from ``cfg.train.seed``
    (layout-independent values) or, without ``initialise`` (weights to be loaded next), left empty but
    for derived buffers. A model already on ``device`` is cut as it is. Pipeline stages need
    ``stage_loss`` (an object with ``loss_from_hidden``, run on the last stage: the algorithm when
    training); without it a pipeline layout is refused in one line. ``frozen`` parts (no backward:
    inference, frozen references) get no gradients, no activation checkpointing and eval mode.
    """
    pipeline = None
    if layout.pp > 1:
        if stage_loss is None:
            raise ConfigError("parallel.pp: this command decodes token by token, which pipeline stages do not run")
        pipeline = build_pipeline(model, mesh["pp"], cfg, layout, stage_loss, device)
        parts: list[nn.Module] = list(pipeline.model_parts)
    else:
        parts = [model]
    for part in parts:
        if frozen:
            part.requires_grad_(False)
        parallelize(part, mesh, layout, cfg, frozen=frozen)
        if device.type != "meta" and any(p.is_meta for p in part.parameters()):
            materialize(part, device, cfg.train.seed if initialise else None)
        if frozen:  # again: tensor parallelism makes new (trainable) parameters of the norms' weights
            part.requires_grad_(False)
            part.eval()
    return parts, pipeline


def inference_config(cfg: HainaConfig, overrides: Sequence[str], batch_size: int, command: str) -> HainaConfig:
    """The model's config with the tool's layout and ``batch_size`` rows per data-parallel rank and
    microbatch; only ``parallel.*`` and ``train.precision`` may be overridden."""
    data = cfg.model_dump()
    data["train"]["precision"] = "fp32"  # whatever the source trained in; bf16 only when asked
    for override in overrides:
        if not override.startswith(OVERRIDE_PREFIXES):
            raise ConfigError(f"override {override!r}: {command} takes parallel.* and train.precision only")
        apply_override(data, override)
    data["train"].update(micro_batch_size=batch_size, global_batch_size=None, resume=False)
    data["parallel"]["activation_checkpoint"] = "none"
    return build_config(data)


@dataclass
class Placed:
    """This rank's share of the model and where it stands in the layout."""

    cfg: HainaConfig
    layout: Any
    mesh: Any
    device: torch.device
    parts: list[nn.Module]
    pipeline: Any
    dp_rank: int
    tp_rank: int
    autocast: Any

    @property
    def model(self) -> nn.Module:
        return self.parts[0]


def place(source: ModelSource, cfg: HainaConfig, world: int, stage_loss: Any = None) -> Placed:
    """The model of ``source`` for inference under ``cfg``'s layout (``cfg`` is the source's config with
    the tool's :func:`inference_config`) on a world of ``world`` ranks (the process group must exist):
    built on the meta device, cut, and only this rank's shards materialised and read from the source.
    Pipeline layouts need ``stage_loss`` (see :func:`lay_out`)."""

    device = default_device()
    p = cfg.parallel
    if p.pp > 1:
        if stage_loss is None:
            raise ConfigError("parallel.pp: this command decodes token by token, which pipeline stages do not run")
        dp_shard = world // (p.tp * p.pp * p.dp_replicate) if p.dp_shard == -1 else p.dp_shard
        cfg.train.global_batch_size = cfg.train.micro_batch_size * p.dp_replicate * max(dp_shard, 1) * p.pp
    layout = resolve_layout(cfg, world)
    mesh = build_mesh(layout, device.type)
    parts, pipeline = lay_out(build_model(cfg, META), cfg, layout, mesh, device, stage_loss=stage_loss,
                              frozen=True, initialise=False)
    for part in parts:
        source.fill(part)
    dp_rank = mesh.get_local_rank("dp_replicate") * layout.dp_shard + mesh.get_local_rank("dp_shard")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    return Placed(cfg, layout, mesh, device, parts, pipeline, dp_rank, mesh.get_local_rank("tp"), autocast)
