"""Every collective haina issues, in one place, on the process group's own device.

NCCL reduces only CUDA tensors and gloo only CPU ones: a CPU flag all-reduced on an NCCL group is the
crash a first multi-GPU resume would hit, and a CPU test on gloo never sees it. So the device of the
process group is recorded when it starts (:func:`haina.core.distributed.init_distributed`); helpers that
reduce Python values (:func:`any_true`, :func:`max_int`, :func:`reduce_values`) build their tensor there,
and helpers that take a tensor refuse one on another device - on gloo too, so the mistake fails on CPU the
way it would fail on GPUs. ``tests/test_collectives.py`` fails on any direct ``torch.distributed``
collective elsewhere in haina.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from haina.core.errors import HainaError

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

_device: torch.device | None = None


class CollectiveDeviceError(HainaError):
    """A tensor handed to a collective lives on another device than the process group's."""


def set_device(device: torch.device | None) -> None:
    """Record the device the process group communicates on (None: forget it, for tests)."""
    global _device
    _device = None if device is None else torch.device(device)


def device() -> torch.device:
    """The process group's device: what :func:`set_device` recorded, else the CPU (gloo)."""
    return _device if _device is not None else torch.device("cpu")


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _check(tensor: torch.Tensor, what: str) -> None:
    want = device()
    if tensor.device.type != want.type:
        raise CollectiveDeviceError(
            f"{what}: tensor on {tensor.device}, but the process group communicates on {want.type} "
            f"(NCCL takes only CUDA tensors, gloo only CPU ones); build it on collectives.device()"
        )


# ------------------------------------------------------------------------------------ tensors in place

def all_reduce(tensor: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group``; returns it. A world of one still runs the collective,
    so one GPU exercises the same NCCL path as many."""
    _check(tensor, "all_reduce")
    if dist.is_initialized():
        dist.all_reduce(tensor, op=OPS[op], group=group)
    return tensor


def all_gather(pieces: list[torch.Tensor], tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Fill ``pieces`` (one per rank of ``group``) with every rank's ``tensor``."""
    _check(tensor, "all_gather")
    if world_size(group) > 1:
        dist.all_gather(pieces, tensor, group=group)
    else:
        pieces[0].copy_(tensor)


def all_to_all_single(
    out: torch.Tensor, tensor: torch.Tensor, out_splits: list[int], in_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> None:
    """``dist.all_to_all_single`` with the device check (tensor parallelism's row exchange)."""
    _check(tensor, "all_to_all_single")
    if world_size(group) > 1:
        dist.all_to_all_single(out, tensor, out_splits, in_splits, group=group)
    else:
        out.copy_(tensor)


# ---------------------------------------------------------------------------------- Python values

def reduce_values(
    values: Sequence[Any] | torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reduce numbers (a list or a tensor anywhere) on the group's device; the result comes back on the CPU."""
    local = torch.as_tensor(values, dtype=dtype)
    if not dist.is_initialized():
        return local.clone()
    on_device = local.to(device())
    all_reduce(on_device, op, group)
    return on_device.cpu()


def max_int(value: int, group: dist.ProcessGroup | None = None) -> int:
    """The largest ``value`` over the group (verdicts, signal numbers)."""
    return int(reduce_values([value], "max", group, torch.int64)[0])


def any_true(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when any rank's ``flag`` is true."""
    return bool(max_int(int(flag), group))


# ------------------------------------------------------------------------------- objects, barriers

def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group``; on NCCL on this rank's GPU (not a guessed one)."""
    if world_size(group) == 1:
        return
    dev = device()
    if dev.type == "cuda" and dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[dev.index if dev.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
