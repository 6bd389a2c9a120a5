"""Process-group set-up: torchrun's environment when present, else a one-process group.

Running a single process inside a (world-size 1) process group keeps one code path: megatron's dataset
builders, DCP and later the device mesh all assume torch.distributed is initialised.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> None:
    """Idempotent: join torchrun's rendezvous (env://) or make a private world of one."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend_for(device))
    else:
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
