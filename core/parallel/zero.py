"""DeepSpeed ZeRO as the data-parallel backend (``parallel.dp_backend=deepspeed``), for runs with tp = pp = 1.

DeepSpeed gets the single-device model, haina's AdamW (DeepSpeed's CPU Adam when the optimizer is
offloaded) and a config derived from haina's own fields: micro and global batch, accumulation, clipping,
BF16 and the ZeRO stage with its offloads (:func:`deepspeed_config`); ``deepspeed.config`` may add advanced
keys. The training loop stays haina's: it sets the learning rate each step (a pure function of the
step, so PPO's several updates per step keep one rate and both backends follow the same schedule), marks
the accumulation boundary on the last micro-batch, and calls ``step`` once per optimizer step.

Losses run inside DeepSpeed's forward (:class:`LossModule`): the chunked loss reads the head weight
outside the head's own forward, and ZeRO-3 gathers such parameters only while its engine is in forward.
A step the loss guard refuses is turned into a non-finite one, which DeepSpeed itself skips and clears.

Checkpoints are DeepSpeed's own (partitioned optimizer states included), written through haina's
:class:`~haina.core.checkpoint.CheckpointManager` so they are published atomically with a manifest;
:func:`convert_checkpoint` turns one into a haina checkpoint (and so into an HF export).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haina.core.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    CheckpointManager,
    TrainerState,
    is_deepspeed_checkpoint,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
    verify,
)
from haina.core.config import HainaConfig, build_config, dump_config
from haina.core.engine import Engine
from haina.core.guard import NONFINITE_GRAD, OK, SpikeGuard, agree
from haina.core.materialize import materialize, materialize_each
from haina.core.model_loading import run_config
from haina.core.optim import build_optimizer, param_groups
from haina.core.parallel.mesh import Layout
from haina.core.parallel.zero_state import import_deepspeed, read_model_state


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: HainaConfig, layout: Layout, on_cuda: bool = False) -> dict[str, Any]:
    """DeepSpeed's config from haina's fields, with ``deepspeed.config`` merged over it."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    for key in ds.TUNED_KEYS:  # the typed GPU-time settings; unset ones stay DeepSpeed's (or config's)
        if getattr(ds, key) is not None:
            zero[key] = getattr(ds, key)
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.global_batch_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # haina logs its own metrics
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        # bf16 parameters and gradients, fp32 master weights and optimizer states in the ZeRO partitions;
        # a non-finite gradient norm skips the step as it does in fp32
        derived["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return _merge(derived, ds.config)


def build_zero_optimizer(model: nn.Module, cfg: HainaConfig) -> torch.optim.Optimizer:
    """haina's AdamW, or DeepSpeed's CPU Adam (AdamW mode, same groups) when optimizer states live on the CPU."""
    if not cfg.deepspeed.offload_optimizer:
        return build_optimizer(model, cfg.optim)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    o = cfg.optim
    return DeepSpeedCPUAdam(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True
    )


def build_partitioned(model: nn.Module, cfg: HainaConfig, layout: Layout, device: torch.device) -> nn.Module:
    """The (meta) trained model on this rank, initialised from ``train.seed``, as DeepSpeed will hold it.

    Under ZeRO-3 each module is materialised, initialised at full size and partitioned over the ranks
    in turn (``deepspeed.zero.Init`` on its own parameters), so a rank holds its partitions plus one
    module's full tensors, never the whole model; :func:`deepspeed.initialize` then finds every parameter
    already partitioned. ZeRO-1 and -2 keep a whole copy of the weights on every rank by design, so the
    model is materialised whole. The initial values are the other backends' (seeded per module name)."""
    if cfg.deepspeed.zero_stage != 3:
        return materialize(model, device, cfg.train.seed)
    deepspeed = import_deepspeed(device)
    os.environ.setdefault("LOCAL_RANK", "0")  # a single process started without torchrun
    deepspeed.init_distributed(verbose=False)  # DeepSpeed's view of the process group haina started
    config = deepspeed_config(cfg, layout, on_cuda=device.type == "cuda")
    # ZeRO-3 leaves the dtype of parameters partitioned before initialize() alone: bf16 is set here
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    def partition(module: nn.Module) -> None:
        own = list(module.parameters(recurse=False))
        if own:
            holder = nn.Module()  # Init(module=...) converts every parameter under a module: only these
            for i, param in enumerate(own):
                param.data = param.data.to(dtype)
                holder.register_parameter(f"p{i}", param)
            deepspeed.zero.Init(module=holder, config_dict_or_path=config)

    return materialize_each(model, device, cfg.train.seed, partition)


class LossModule(nn.Module):
    """What DeepSpeed wraps: the trained model, plus a forward that runs any loss function on it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Any, *args: Any) -> tuple[torch.Tensor, Any]:
        out = loss_fn(self.model, *args)
        return out.loss, out  # the tensor first, so ZeRO-3 hooks the backward through it


class ZeroEngine(Engine):
    """:class:`~haina.core.train.Engine` on a DeepSpeed engine; the algorithm-facing API is the same."""

    ds: Any = None

    def attach(self) -> None:
        """Hand the model and its optimizer to DeepSpeed (after the algorithm's ``setup`` loaded weights)."""
        deepspeed = import_deepspeed(self.device)
        model = self.parts[0]
        optimizer = build_zero_optimizer(model, self.cfg)
        config = deepspeed_config(self.cfg, self.layout, on_cuda=self.device.type == "cuda")
        os.environ.setdefault("LOCAL_RANK", "0")  # a single process started without torchrun
        self.ds, optimizer, _, _ = deepspeed.initialize(model=LossModule(model), optimizer=optimizer, config=config)
        self.optimizers = [optimizer]
        # every backward reduces unless the loop says otherwise (it marks all but the last micro-batch)
        self.ds.set_gradient_accumulation_boundary(True)

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def forward_loss(self, loss_fn: Any, *args: Any) -> Any:
        loss, out = self.ds(loss_fn, *args)
        return dataclasses.replace(out, loss=loss)

    def mark_accumulation_boundary(self, last: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # haina divides by the accumulation steps itself

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def optimizer_step(self, max_norm: float | None = None) -> float:
        """One update at the configured clip (DeepSpeed clips inside its step); a non-finite gradient norm
        makes DeepSpeed skip it, counted in ``skipped_updates``."""
        if max_norm is not None and max_norm != self.cfg.optim.clip_grad:
            raise ValueError("the deepspeed backend clips at optim.clip_grad only")
        self.ds.step()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            self.skipped_updates += 1
        return norm

    def update(self, pending: torch.Tensor | None, loss: float, guard: SpikeGuard) -> tuple[float, int]:
        """Judge the loss first; a refused step backpropagates NaN so DeepSpeed's own overflow path skips
        the update and clears the accumulated gradients; then the gradient norm is judged."""
        verdict = agree(guard.verdict(loss, 0.0))
        if pending is not None:
            self.backward(pending if verdict == OK else pending * float("nan"))
        self.ds.step()
        norm = self.grad_norm()
        if verdict == OK and not math.isfinite(norm):
            verdict = NONFINITE_GRAD
        return norm, verdict

    def save(self, manager: CheckpointManager, trainer: TrainerState, block: bool = False) -> Path:
        def write(tmp: Path) -> None:
            self.ds.save_checkpoint(
                str(tmp.parent), tag=tmp.name, client_state={"rng": rng_state()}, save_latest=False
            )

        return manager.save_with(trainer, write, block=block)

    def load(self, step_dir: Path) -> TrainerState:
        verify(step_dir)
        if not is_deepspeed_checkpoint(step_dir):
            raise CheckpointError(
                f"{step_dir}: written by the fsdp2 backend; resume it with parallel.dp_backend=fsdp2"
            )
        _, client = self.ds.load_checkpoint(str(step_dir.parent), tag=step_dir.name)
        set_rng_state(client["rng"])
        return TrainerState(**json.loads((step_dir / TRAINER_STATE).read_text()))


def convert_checkpoint(source: str | Path, out: str | Path, config: str | None = None) -> Path:
    """A DeepSpeed checkpoint (run directory or step folder) -> a haina run directory with the same weights.

    One process: DeepSpeed's reader joins the ZeRO partitions into full fp32 tensors on the CPU, which
    are written as a model-only DCP checkpoint at the same step, with the run's config (backend fsdp2).
    ``align.init_from``, ``haina export hf``, ``eval`` and ``generate`` then read it like any other.
    """
    import torch.distributed.checkpoint as dcp

    step_dir = resolve_checkpoint(source)
    if not is_deepspeed_checkpoint(step_dir):
        raise CheckpointError(f"{step_dir}: not a DeepSpeed checkpoint (it is haina's own already)")
    verify(step_dir)
    model_state = read_model_state(step_dir)
    trainer = TrainerState(**json.loads((step_dir / TRAINER_STATE).read_text()))
    data = run_config(step_dir, config).model_dump(mode="json")
    out = Path(out)
    data["train"]["run_dir"] = str(out)
    data["parallel"]["dp_backend"] = "fsdp2"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(build_config(data)), encoding="utf-8")

    def write(tmp: Path) -> None:
        dcp.save({"model": model_state}, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))

    return CheckpointManager(out / "checkpoints").save_with(trainer, write, block=True)
