"""Checkpoints with torch.distributed.checkpoint: model, optimizer, RNG and the trainer's position.

Tensors go through DCP (so a later layout can reshard them); the small scalar trainer state is JSON, and
DCP's own pickled metadata is read through an allowlist (:mod:`haina.core.checkpoint_manifest`), so
loading never runs pickled code. Layout: ``checkpoints/step_N/`` plus ``checkpoints/latest``, a text file
naming the newest complete step directory.

Crash safety: a checkpoint is written into a hidden ``.step_N.partial`` folder, its files listed with
size and crc32 in ``manifest.json`` and fsynced, the folder renamed to ``step_N`` and only then
``latest`` replaced (atomically). A crash at any moment leaves the previous checkpoint as ``latest``;
a damaged file is named on load. :class:`CheckpointManager` writes asynchronously and keeps the last K.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
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

from haina.core import collectives, faults
from haina.core.checkpoint_reader import SafeLoadPlanner, SafeReader
from haina.core.distributed import is_main_process
from haina.core.errors import InputFileError, one_line
from haina.core.files import (
    MANIFEST,
    CheckpointError,
    manifest_entries,
    publish_dir,
    verify_manifest,
    write_durable,
)
from haina.core.materialize import fill_from_full
from haina.core.parallel.zero_state import full_shape, is_partitioned, read_model_state, whole

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands: the next optimizer step and the samples consumed so far."""

    step: int = 0
    consumed_samples: int = 0
    guard: dict[str, Any] | None = None  # the loss-spike guard's window, so a resumed run decides alike


def rng_state() -> dict[str, torch.Tensor]:
    """torch's generators: the only randomness the loop draws from (data order is megatron's seeded index)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
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


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_")) if path.name.startswith("step_") and path.name[5:].isdigit() else -1


def _published(root: Path) -> list[Path]:
    """Complete step folders (renamed into place, so with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) >= 0 and (p / "manifest.json").is_file()]
    return sorted(found, key=_step_of)


def _barrier() -> None:
    collectives.barrier()


class CheckpointManager:
    """Saves (asynchronously when asked), publishes atomically, keeps the newest ``keep`` checkpoints.

    At most one save is in flight: the next save, :meth:`wait` and :meth:`close` finish it first. The
    files are written by every rank; the rank-0 process publishes (manifest, rename, ``latest``) once
    DCP's save has completed, which for rank 0 means every rank's files are written and fsynced.
    """

    def __init__(self, root: Path, keep: int = 0, async_save: bool = False) -> None:
        self.root = Path(root)
        self.keep = keep
        self.last_saved_step: int | None = None
        self._pending: tuple[Any, Path, Path, TrainerState, dict | None] | None = None
        # async saves run their collectives in a thread: give them their own gloo group (never the
        # training group, whose collectives the main thread issues meanwhile)
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.async_save = async_save
        if is_main_process():
            clean_leftovers(self.root)
        _barrier()

    def save(
        self, parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], trainer: TrainerState,
        *, block: bool = False,
    ) -> Path:
        """Start writing ``step_N`` through DCP (collective); returns its final path. ``block`` waits for it."""

        def write(tmp: Path) -> Any:
            state = _gather_state(_as_list(parts), _as_list(optimizers))
            state["rng"] = rng_state()
            writer = dcp.FileSystemWriter(str(tmp), sync_files=True)
            if self.async_save:
                return dcp.async_save(state, storage_writer=writer, process_group=self._group)
            dcp.save(state, storage_writer=writer)
            return None

        return self.save_with(trainer, write, block=block)

    def save_with(self, trainer: TrainerState, write: Callable[[Path], Any], *, block: bool = False) -> Path:
        """Let ``write(folder)`` (collective) fill the hidden folder of ``step_N``, then publish it: at once if
        it returns None, else when the future it returns is done. Any checkpoint format goes this way."""
        self.wait()
        final = self.root / f"step_{trainer.step}"
        tmp = self.root / f".step_{trainer.step}.partial"
        if is_main_process():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        snapshot = TrainerState(**json.loads(json.dumps(asdict(trainer))))
        try:
            with _single_process_quiet():
                future = write(tmp)
        except (Exception, dcp.api.CheckpointException) as exc:  # torch's is a BaseException
            raise _write_failed(tmp, final, exc) from None
        known = _shared_manifest_entries(tmp) if future is None else None
        self._pending = (future, tmp, final, snapshot, known)
        self.last_saved_step = trainer.step
        if block or future is None:
            self.wait()
        return final

    def poll(self) -> None:
        """Publish a finished asynchronous save without waiting for one that is still writing."""
        if self._pending is not None and (self._pending[0] is None or self._pending[0].done()):
            self.wait()

    def wait(self) -> None:
        """Finish the save in flight, if any, and publish it (rank 0)."""
        if self._pending is None:
            return
        future, tmp, final, trainer, known = self._pending
        self._pending = None
        if future is not None:
            try:
                future.result()
            except (Exception, dcp.api.CheckpointException) as exc:
                raise _write_failed(tmp, final, exc) from None
        if is_main_process():
            _publish(tmp, final, trainer, self.keep, known)

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


def clean_leftovers(root: Path) -> None:
    """Remove what an interrupted save or publish can leave: ``.step_N.partial`` (never published),
    ``.step_N.old`` (a replaced folder whose removal was cut short), ``.latest.tmp`` (a pointer never
    renamed into place). None of them is ever read, and on a full disk they hold the space a save needs."""
    if not root.is_dir():
        return
    for stale in [*root.glob(".step_*.partial"), *root.glob(".step_*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)


def _gib(n: float) -> str:
    """Bytes for a person: GiB, MiB or KiB, whichever reads best."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _write_failed(tmp: Path, final: Path, exc: BaseException) -> CheckpointError:
    """One line for a save that failed while writing (a full disk, most often: torch then reports only
    ``unexpected pos`` from its zip writer); the half-written folder is removed at once, so the space is
    free again and the previous checkpoint stays the one ``latest`` names."""
    cause = exc
    if isinstance(exc, dcp.api.CheckpointException) and exc.failures:
        cause = next(iter(exc.failures.values()))[0]
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    root = final.parent
    free = shutil.disk_usage(root).free if root.is_dir() else 0
    previous = latest_checkpoint(root)
    need = ""
    if previous is not None and (previous / MANIFEST).is_file():
        size = sum(e["size"] for e in json.loads((previous / MANIFEST).read_text())["files"].values())
        need = f", a checkpoint needs about {_gib(size)}"
    kept = f"{previous.name} stays the latest" if previous is not None else "no earlier checkpoint"
    return CheckpointError(
        f"{final}: checkpoint write failed after {_gib(written)}: {type(cause).__name__}: {one_line(cause)} "
        f"({_gib(free)} free on {root}{need}); {kept}"
    )


def _shared_manifest_entries(tmp: Path) -> dict[str, dict[str, Any]]:
    """Once every rank's files are written (a collective), each rank fsyncs and checksums every world-th
    of them and rank 0 gathers the entries: at 13B that is ~170 GB, which rank 0 alone would read while
    the others wait in a collective. An asynchronous save's files are checksummed by rank 0 when it
    publishes (the other ranks are training meanwhile, not waiting on it)."""
    _barrier()  # every rank's files are written before any is listed
    rank, world = collectives.rank_world()
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    merged: dict[str, dict[str, Any]] = {}
    for part in collectives.all_gather_object(manifest_entries(tmp, names[rank::world])):
        merged.update(part)
    return merged


def _publish(tmp: Path, final: Path, trainer: TrainerState, keep: int, known: dict | None = None) -> None:
    """Trainer state, then the one atomic publish (manifest, rename), then ``latest``; prune old ones."""
    faults.fire("save_written", trainer.step)
    (tmp / TRAINER_STATE).write_text(json.dumps(asdict(trainer)))
    publish_dir(tmp, final, before_rename=lambda: faults.fire("save_manifest", trainer.step), known=known)
    faults.fire("save_renamed", trainer.step)
    write_durable(final.parent / LATEST, final.name)
    if keep > 0:
        for old in _published(final.parent)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    checkpoint_root: Path,
    parts: nn.Module | Sequence[nn.Module],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    trainer: TrainerState,
) -> Path:
    """Write ``step_N`` (collectively, every rank), publish it and point ``latest`` at it; synchronous."""
    manager = CheckpointManager(checkpoint_root)
    path = manager.save(_as_list(parts), _as_list(optimizers), trainer, block=True)
    _barrier()
    return path


def is_deepspeed_checkpoint(step_dir: Path) -> bool:
    """Written by the deepspeed backend (DeepSpeed's own files, not DCP's)."""
    return any(Path(step_dir).glob("*model_states.pt"))


def _require_dcp(step_dir: Path) -> None:
    if is_deepspeed_checkpoint(step_dir):
        raise CheckpointError(
            f"{step_dir}: a DeepSpeed checkpoint; resume it with parallel.dp_backend=deepspeed, or convert it "
            f"with: haina import deepspeed --checkpoint {step_dir} --out NEW_RUN"
        )


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The step folder ``latest`` names; else the newest published one (a crash between the rename and
    the pointer update); else None."""
    pointer = checkpoint_root / LATEST
    if pointer.is_file():
        step_dir = checkpoint_root / pointer.read_text().strip()
        if (step_dir / TRAINER_STATE).is_file():
            return step_dir
    published = _published(checkpoint_root)
    return published[-1] if published else None


def verify(step_dir: Path) -> None:
    """Check the manifest, sharing the reading between ranks when a process group exists; every rank
    raises (the rank that found the damage names the file)."""
    rank, world = collectives.rank_world()
    error: CheckpointError | None = None
    try:
        verify_manifest(step_dir, (rank, world))
    except CheckpointError as exc:
        error = exc
    if collectives.any_true(error is not None) and error is None:
        error = CheckpointError(f"{step_dir}: failed verification on another rank (see its error)")
    if error is not None:
        raise error


def _load(state: dict[str, Any], step_dir: Path) -> None:
    with _single_process_quiet():
        dcp.load(state, storage_reader=SafeReader(str(step_dir)), planner=SafeLoadPlanner())


def load_checkpoint(
    step_dir: Path,
    parts: nn.Module | Sequence[nn.Module],
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> TrainerState:
    """Verify, then load in place (model parts and, if given, optimizers and RNG); return the trainer state."""
    parts, optimizers = _as_list(parts), _as_list(optimizers)
    _require_dcp(step_dir)
    verify(step_dir)
    state = _gather_state(parts, optimizers)
    if optimizers:
        state["rng"] = rng_state()
    _load(state, step_dir)
    for i, part in enumerate(parts):
        if optimizers:
            set_state_dict(
                part, optimizers[i], model_state_dict=state["model"], optim_state_dict=state["optim"],
                options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False),
            )
        else:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
    if optimizers:
        set_rng_state(state["rng"])
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
    raise InputFileError(f"{source}: no checkpoint (neither a step directory nor a run with one)")


def load_model_weights(
    source: str | Path, module: nn.Module, prefix: str = "", source_prefix: str = ""
) -> list[str]:
    """Load the weights a checkpoint has for ``module``: its parameter ``prefix + name`` reads the
    checkpoint's ``source_prefix + name`` (PPO's actor is ``actor.*`` in a PPO run, plain in an SFT run).

    Only the model is read, never the optimizer. Parameters the checkpoint lacks or holds with another
    shape (a value head in the LM head's place) keep their current values and are returned by name, so an
    algorithm can start a reward model or critic from a language model, or an actor from ``actor.``-less
    SFT weights.

    A DeepSpeed checkpoint (``parallel.dp_backend=deepspeed``) is read too, joined into full fp32 tensors
    in this process; ``haina import deepspeed`` converts one once for sharded reads at scale.
    """
    step_dir = resolve_checkpoint(source)
    verify_manifest(step_dir)
    deepspeed = is_deepspeed_checkpoint(step_dir)
    if deepspeed:
        full = read_model_state(step_dir)
        shapes = {k: tuple(v.shape) for k, v in full.items()}
    else:
        stored = SafeReader(str(step_dir)).read_metadata().state_dict_metadata
        shapes = {k[len("model.") :]: tuple(getattr(m, "size", ())) for k, m in stored.items() if k.startswith("model.")}
    partitioned = is_partitioned(module)  # ZeRO-3 built it: its parameters are empty placeholders
    state = module.state_dict(keep_vars=True) if partitioned else get_model_state_dict(module)
    wanted: dict[str, Any] = {}
    skipped: list[str] = []
    for name, tensor in state.items():
        key = name[len(prefix) :] if name.startswith(prefix) else None
        shape = shapes.get(f"{source_prefix}{key}") if key is not None else None
        if shape != full_shape(tensor):
            if key is not None:
                skipped.append(name)
            continue
        wanted[source_prefix + key] = tensor
    if deepspeed or partitioned:  # one tensor at a time, each into this rank's shard or partition of it
        with torch.no_grad():
            for key, tensor in wanted.items():
                with whole(tensor) as target:
                    if deepspeed:
                        fill_from_full(target, full.pop(key))
                    else:
                        _load({"model": {key: target}}, step_dir)
        return skipped
    _load({"model": wanted}, step_dir)
    loaded = {prefix + k[len(source_prefix) :]: v for k, v in wanted.items()}
    set_model_state_dict(module, loaded, options=StateDictOptions(strict=False))
    return skipped


def load_frozen_weights(source: str | Path, module: nn.Module) -> None:
    """Every weight of a frozen model (reference, reward model) from ``source``: its shards were never
    initialised, so a weight the checkpoint lacks is refused in one line rather than left as garbage."""
    missing = load_model_weights(source, module)
    if missing:
        raise InputFileError(
            f"{source}: no weight {missing[0]} of the frozen model's shape in the checkpoint ({len(missing)} "
            "missing; a checkpoint of another model config?)"
        )
