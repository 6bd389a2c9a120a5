"""A DeepSpeed checkpoint's model weights, read without the training engine (``haina.core.checkpoint``
reads them through here; the backend itself is :mod:`haina.core.parallel.zero`).

The one place that imports DeepSpeed: on its CPU accelerator when there is no GPU, and with a one-line
error when it is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

PREFIX = "model."  # LossModule's name for the trained model inside DeepSpeed's state dicts


def import_deepspeed(device: torch.device) -> Any:
    """``deepspeed``, on its CPU accelerator (gloo) when training on the CPU; a one-line error if absent."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise RuntimeError(
            f"parallel.dp_backend=deepspeed needs DeepSpeed: pip install 'haina[deepspeed]' ({exc})"
        ) from None
    if device.type == "cpu":
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce (C++, ~20 s on two cores) at its
        # first init_distributed; only its inference all-reduce uses it, which ZeRO training never calls.
        # (the module from sys.modules: ``import deepspeed.comm.torch as m`` binds the ``torch`` package,
        # an attribute of ``deepspeed.comm``)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = _no_shm_op
    return deepspeed


def _no_shm_op() -> None:
    return None


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's shape; for a ZeRO-3-partitioned parameter (an empty placeholder) the whole one's."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions ``module``'s parameters (they were built under ``deepspeed.zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def whole(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """``tensor`` at its full size inside the block: a ZeRO-3 partition is gathered, and on leaving rank
    0's values (every rank writes the same) are partitioned again. Other tensors are yielded as they are."""
    if not hasattr(tensor, "ds_id"):
        yield tensor
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
        yield tensor.data


def read_model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The trained model's full fp32 tensors from a DeepSpeed checkpoint (ZeRO partitions joined, on the CPU)."""
    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _quiet_reader():
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {k.removeprefix(PREFIX): v.contiguous() for k, v in state.items()}


@contextlib.contextmanager
def _quiet_reader() -> Iterator[None]:
    """DeepSpeed's reader prints a progress bar and a line per file to stdout; keep stdout for results."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
