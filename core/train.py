"""The training loop: one optimizer step at a time, with accumulation, mixed precision and checkpoints.

What a step computes is the algorithm plugin's business (pretrain, and later sft, dpo, ...); this loop
owns everything around it: seeding, the schedule, clipping, metrics, progress, saving and resuming.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from haina.core.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from haina.core.config import ConfigError, HainaConfig, dump_config
from haina.core.distributed import init_distributed
from haina.core.metrics import MetricsWriter, peak_tflops, training_flops_per_token
from haina.core.model import Transformer
from haina.core.optim import build_optimizer, lr_at, set_lr
from haina.plugins import registry


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    records: list[dict[str, Any]]


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_model(cfg: HainaConfig, device: torch.device) -> Transformer:
    """fp32 parameters (the master copy); bf16 happens in autocast, not in the weights."""
    torch.manual_seed(cfg.train.seed)
    with device:
        model = Transformer(cfg.model)
    model.init_weights()
    return model


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    progress.add_task("train", total=total, completed=done, status="")
    return progress


def train(cfg: HainaConfig, device: torch.device | None = None) -> TrainResult:
    """Train until ``cfg.train.steps``, resuming from the run directory's latest checkpoint if asked."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("WORLD_SIZE > 1: multi-process training needs the parallel engine, not built yet")
    device = device or default_device()
    init_distributed(device)
    run_dir = Path(cfg.train.run_dir)
    checkpoints = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optim)
    algorithm = registry.get("algorithm", cfg.algorithm)(cfg)
    batches = algorithm.batches(cfg, run_dir)

    state = TrainerState()
    latest = latest_checkpoint(checkpoints) if cfg.train.resume else None
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)

    tcfg = cfg.train
    tokens_per_step = tcfg.micro_batch_size * tcfg.grad_accum_steps * tcfg.seq_len
    flops_per_token = training_flops_per_token(cfg.model, tcfg.seq_len)
    peak = peak_tflops(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    metrics = MetricsWriter(run_dir)
    records: list[dict[str, Any]] = []
    last_loss = float("nan")
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    window: dict[str, float] = {}

    with _progress(tcfg.progress, tcfg.steps, state.step) as progress:
        while state.step < tcfg.steps:
            lr = lr_at(state.step, cfg.optim, tcfg.steps)
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for _ in range(tcfg.grad_accum_steps):
                batch = batches.batch(state.consumed_samples // tcfg.micro_batch_size)
                with autocast:
                    out = algorithm.loss(model, batch)
                (out.loss / tcfg.grad_accum_steps).backward()
                state.consumed_samples += tcfg.micro_batch_size
                sums["loss"] = sums.get("loss", 0.0) + out.loss.item()
                for name, value in out.parts.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            state.step += 1
            window_tokens += tokens_per_step
            window_steps += 1
            for name, value in sums.items():
                window[name] = window.get(name, 0.0) + value / tcfg.grad_accum_steps
            last_loss = sums["loss"] / tcfg.grad_accum_steps

            if state.step % tcfg.log_every == 0 or state.step == tcfg.steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed
                record: dict[str, Any] = {"step": state.step}
                record.update({k: v / window_steps for k, v in window.items()})  # mean over the window
                record.update(
                    grad_norm=float(grad_norm), lr=lr, tokens_per_s=tokens_per_s,
                    tflops=tokens_per_s * flops_per_token / 1e12, memory_gib=_memory_gib(device),
                )
                if peak:
                    record["mfu"] = record["tflops"] / peak
                metrics.log(record)
                records.append(record)
                window_start, window_tokens, window_steps, window = time.perf_counter(), 0, 0, {}
            if state.step % tcfg.save_every == 0 or state.step == tcfg.steps:
                save_checkpoint(checkpoints, model, optimizer, state)
            if progress is not None:
                progress.update(progress.task_ids[0], completed=state.step, status=f"loss {last_loss:.4f}")
    metrics.close()
    return TrainResult(run_dir=run_dir, steps=state.step, final_loss=last_loss, records=records)
