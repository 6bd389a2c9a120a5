"""Checkpoints with torch.distributed.checkpoint: model, optimizer, RNG and the trainer's position.

Tensors go through DCP (so a later layout can reshard them); the small scalar trainer state is JSON, so
nothing in a checkpoint is unpickled on load. Layout: ``checkpoints/step_N/`` plus ``checkpoints/latest``,
a text file naming the newest complete step directory (written last, so a crash mid-save leaves the
previous checkpoint as ``latest``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from haina.core.distributed import is_main_process

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands: the next optimizer step and the samples consumed so far."""

    step: int = 0
    consumed_samples: int = 0


def _rng_state() -> dict[str, torch.Tensor]:
    """torch's generators: the only randomness the loop draws from (data order is megatron's seeded index)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_checkpoint(
    checkpoint_root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: TrainerState
) -> Path:
    """Write ``step_N`` and then point ``latest`` at it."""
    step_dir = checkpoint_root / f"step_{trainer.step}"
    if is_main_process() and step_dir.exists():
        shutil.rmtree(step_dir)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state, "rng": _rng_state()}, checkpoint_id=str(step_dir))
    if is_main_process():
        (step_dir / TRAINER_STATE).write_text(json.dumps(asdict(trainer)))
        tmp = checkpoint_root / f".{LATEST}.tmp"
        tmp.write_text(step_dir.name)
        os.replace(tmp, checkpoint_root / LATEST)
    return step_dir


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    pointer = checkpoint_root / LATEST
    if not pointer.is_file():
        return None
    step_dir = checkpoint_root / pointer.read_text().strip()
    return step_dir if (step_dir / TRAINER_STATE).is_file() else None


def load_checkpoint(
    step_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> TrainerState:
    """Load in place (model and, if given, optimizer and RNG) and return the trainer state."""
    if optimizer is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "rng": _rng_state()}
    else:
        state = {"model": get_state_dict(model, [])[0]}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(step_dir))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _set_rng_state(state["rng"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    return TrainerState(**json.loads((step_dir / TRAINER_STATE).read_text()))
