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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

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


_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _gather_state(
    parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
) -> dict[str, dict[str, Any]]:
    """One flat, FQN-keyed model and optimizer state over all of this rank's model parts.

    Keys are the full model's parameter names whatever the layout (pipeline stages keep them), so a
    checkpoint written under one layout loads under another.
    """
    model_state: dict[str, Any] = {}
    optim_state: dict[str, Any] = {}
    for i, part in enumerate(parts):
        if optimizers:
            m, o = get_state_dict(part, optimizers[i], options=_OPTIONS)
            optim_state.update(o)
        else:
            m = get_model_state_dict(part, options=_OPTIONS)
        model_state.update(m)
    state: dict[str, dict[str, Any]] = {"model": model_state}
    if optimizers:
        state["optim"] = optim_state
    return state


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def save_checkpoint(
    checkpoint_root: Path,
    parts: nn.Module | Sequence[nn.Module],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    trainer: TrainerState,
) -> Path:
    """Write ``step_N`` (collectively, every rank) and then point ``latest`` at it."""
    step_dir = checkpoint_root / f"step_{trainer.step}"
    if is_main_process() and step_dir.exists():
        shutil.rmtree(step_dir)
    if dist.is_initialized():
        dist.barrier()
    state = _gather_state(_as_list(parts), _as_list(optimizers))
    state["rng"] = _rng_state()
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(step_dir))
    if is_main_process():
        (step_dir / TRAINER_STATE).write_text(json.dumps(asdict(trainer)))
        tmp = checkpoint_root / f".{LATEST}.tmp"
        tmp.write_text(step_dir.name)
        os.replace(tmp, checkpoint_root / LATEST)
    if dist.is_initialized():
        dist.barrier()
    return step_dir


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    pointer = checkpoint_root / LATEST
    if not pointer.is_file():
        return None
    step_dir = checkpoint_root / pointer.read_text().strip()
    return step_dir if (step_dir / TRAINER_STATE).is_file() else None


def load_checkpoint(
    step_dir: Path,
    parts: nn.Module | Sequence[nn.Module],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> TrainerState:
    """Load in place (model parts and, if given, optimizers and RNG); return the trainer state."""
    parts, optimizers = _as_list(parts), _as_list(optimizers)
    state = _gather_state(parts, optimizers)
    if optimizers:
        state["rng"] = _rng_state()
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(step_dir))
    for i, part in enumerate(parts):
        if optimizers:
            set_state_dict(
                part, optimizers[i], model_state_dict=state["model"], optim_state_dict=state["optim"],
                options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False),
            )
        else:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
    if optimizers:
        _set_rng_state(state["rng"])
    return TrainerState(**json.loads((step_dir / TRAINER_STATE).read_text()))


def resolve_checkpoint(source: str | Path) -> Path:
    """A step directory as given, or the latest step of a run directory or of its ``checkpoints`` folder."""
    path = Path(source)
    if (path / TRAINER_STATE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{source}: no checkpoint (neither a step directory nor a run with one)")


def load_model_weights(
    source: str | Path, module: nn.Module, prefix: str = "", source_prefix: str = ""
) -> list[str]:
    """Load the weights a checkpoint has for ``module``: its parameter ``prefix + name`` reads the
    checkpoint's ``source_prefix + name`` (PPO's actor is ``actor.*`` in a PPO run, plain in an SFT run).

    Only the model is read, never the optimizer. Parameters the checkpoint lacks or holds with another
    shape (a value head in the LM head's place) keep their current values and are returned by name, so an
    algorithm can start a reward model or critic from a language model, or an actor from ``actor.``-less
    SFT weights.
    """
    step_dir = resolve_checkpoint(source)
    stored = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    state = get_model_state_dict(module)
    wanted: dict[str, Any] = {}
    skipped: list[str] = []
    for name, tensor in state.items():
        key = name[len(prefix) :] if name.startswith(prefix) else None
        meta = stored.get(f"model.{source_prefix}{key}") if key is not None else None
        if meta is None or tuple(getattr(meta, "size", ())) != tuple(tensor.shape):
            if key is not None:
                skipped.append(name)
            continue
        wanted[source_prefix + key] = tensor
    with _single_process_quiet():
        dcp.load({"model": wanted}, checkpoint_id=str(step_dir))
    loaded = {prefix + k[len(source_prefix) :]: v for k, v in wanted.items()}
    set_model_state_dict(module, loaded, options=StateDictOptions(strict=False))
    return skipped
