"""The engine an algorithm trains with: the layout, the trained parts and their optimizers, frozen helpers.

The training loop (:mod:`haina.core.train`) drives an :class:`Engine` through a few methods (``set_lr``,
``forward_loss``, ``mark_accumulation_boundary``, ``backward``, ``update``, ``save``, ``load``) so that another
data-parallel backend (:class:`haina.core.parallel.zero.ZeroEngine`) is a subclass, not a second loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haina.core.checkpoint import (
    CheckpointManager,
    TrainerState,
    load_checkpoint,
    load_frozen_weights,
)
from haina.core.config import HainaConfig
from haina.core.guard import OK, SpikeGuard, agree
from haina.core.optim import set_lr
from haina.core.parallel.mesh import Layout
from haina.core.parallel.parallelize import clip_grad_norm
from haina.core.placement import lay_out


@dataclass
class Engine:
    """What an algorithm may use: the layout, the trained parts and their optimizers, frozen helpers."""

    cfg: HainaConfig
    layout: Layout
    mesh: Any
    device: torch.device
    parts: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    autocast: Any
    pp_group: Any = None
    dp_rank: int = 0
    skipped_updates: int = 0  # updates refused for a non-finite gradient norm

    def prepare_frozen(self, module: nn.Module, source: str | None) -> nn.Module:
        """A model that does not train (reference, reward model), built on the meta device: cut by the
        trained model's layout, then only this rank's shards materialised and read from ``source``
        (initialised from the seed when there is none)."""
        (part,), _ = lay_out(module, self.cfg, self.layout, self.mesh, self.device, frozen=True,
                             initialise=source is None)
        if source is not None:
            load_frozen_weights(source, part)
        return part

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            set_lr(optimizer, lr)

    def forward_loss(self, loss_fn: Any, *args: Any) -> Any:
        """``loss_fn(model, *args)``: the trained model's loss, run the way the backend needs it run."""
        return loss_fn(self.parts[0], *args)

    def mark_accumulation_boundary(self, last: bool) -> None:
        """Whether the coming backward is the step's last micro-batch (DeepSpeed's boundary).

        FSDP2 reduce-scatters every micro-batch's gradients: turning its sync off for accumulation would
        make it keep an unsharded fp32 gradient for every parameter (+28 GB per GPU at 7B), so it is never
        turned off; the reduce-scatter overlaps the next micro-batch's backward."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def clip_gradients(self, max_norm: float | None = None) -> float:
        """Clip the global gradient norm (``optim.clip_grad`` unless given); the norm, equal on all ranks."""
        params = [p for part in self.parts for p in part.parameters()]
        clip = self.cfg.optim.clip_grad if max_norm is None else max_norm
        return float(clip_grad_norm(params, clip, self.pp_group))

    def step_optimizers(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def optimizer_step(self, max_norm: float | None = None) -> float:
        """Clip, then step unless the (global) norm is non-finite (counted in ``skipped_updates``)."""
        norm = self.clip_gradients(max_norm)
        if math.isfinite(norm) or not self.cfg.train.guard.enabled:
            self.step_optimizers()
        else:
            self.skipped_updates += 1
        return norm

    def update(self, pending: torch.Tensor | None, loss: float, guard: SpikeGuard) -> tuple[float, int]:
        """The end of a step: backpropagate the last micro-batch's ``pending`` loss, clip, let the guard
        judge the (reduced) loss and gradient norm, step if it agrees; (gradient norm, verdict)."""
        if pending is not None:
            self.backward(pending)
        norm = self.clip_gradients()
        verdict = agree(guard.verdict(loss, norm))
        if verdict == OK:
            self.step_optimizers()
        return norm, verdict

    def save(self, manager: CheckpointManager, trainer: TrainerState, block: bool = False) -> Path:
        return manager.save(self.parts, self.optimizers, trainer, block=block)

    def load(self, step_dir: Path) -> TrainerState:
        """Model, optimizer and RNG from ``step_dir`` in place; the trainer state it was saved with."""
        return load_checkpoint(step_dir, self.parts, self.optimizers)
