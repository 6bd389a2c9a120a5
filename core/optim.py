"""AdamW with Baichuan 2's settings and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from haina.core.config import OptimConfig
from haina.core.parallel.zero_state import full_shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every matrix, embeddings and head included; exempt vectors (norm gains, any biases).

    Decaying a norm's gain pulls it toward zero and so scales whole activations down, which fights the
    normalization; embedding and head rows are ordinary weights and keep their decay, as in Megatron.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if len(full_shape(param)) >= 2 else no_decay).append(param)  # ZeRO-3 holds placeholders
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def optimizer_backend(model: nn.Module) -> str:
    """Which AdamW implementation :func:`build_optimizer` uses for ``model``'s parameters.

    apex's FusedAdam when apex is importable and every parameter is a plain CUDA tensor (it does not know
    DTensors, i.e. FSDP2 or tensor-parallel shards); else torch's AdamW, fused (one pass over each
    parameter instead of a dozen elementwise sweeps) on CUDA, and on CPU for plain tensors, where it is
    about 7x faster than the foreach implementation.
    """
    params = list(model.parameters())
    from torch.distributed.tensor import (
        DTensor,  # ~0.4 s: `haina plugins` asks apex_adam_available without it
    )

    plain = not any(isinstance(p, DTensor) for p in params)
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    on_cpu = bool(params) and all(p.device.type == "cpu" for p in params)
    if on_cuda and plain and apex_adam_available():
        return "apex"
    return "torch-fused" if on_cuda or (on_cpu and plain) else "torch"


@functools.cache
def apex_adam_available() -> bool:
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:
        return False
    return True


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """fp32 AdamW over the fp32 master parameters; the fused kernel where the device has one."""
    backend = optimizer_backend(model)
    groups = param_groups(model, cfg.weight_decay)
    if backend == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adam_w_mode=True)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=(backend == "torch-fused") or None,
    )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``.

    A pure function of the step, so resuming needs only the step count.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or total_steps
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
