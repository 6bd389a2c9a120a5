"""The training loop: one optimizer step at a time, under any parallel layout.

What a step computes is the algorithm plugin's business (pretrain, and later sft, dpo, ...); this loop
owns everything around it: process group and mesh, seeding, per-rank data, the schedule, clipping,
metrics, progress, saving and resuming. One process is a world of one, so there is one code path.
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
import torch.distributed as dist
from torch import nn

from haina.core.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from haina.core.config import HainaConfig, dump_config
from haina.core.distributed import init_distributed, is_main_process
from haina.core.metrics import MetricsWriter, peak_tflops, training_flops_per_token
from haina.core.model import Transformer
from haina.core.optim import build_optimizer, lr_at, set_lr
from haina.core.parallel.mesh import Layout, build_mesh, resolve_layout
from haina.core.parallel.parallelize import clip_grad_norm, parallelize
from haina.plugins import registry


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    records: list[dict[str, Any]]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_model(cfg: HainaConfig, device: torch.device) -> Transformer:
    """fp32 parameters (the master copy), the same on every rank (same seed); bf16 lives in autocast."""
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


def _dp_rank(mesh: Any, layout: Layout) -> int:
    return mesh.get_local_rank("dp_replicate") * layout.dp_shard + mesh.get_local_rank("dp_shard")


def _set_gradient_sync(parts: list[nn.Module], enabled: bool) -> None:
    """FSDP2 reduces gradients on the last micro-batch only; earlier ones accumulate locally."""
    for part in parts:
        if hasattr(part, "set_requires_gradient_sync"):
            part.set_requires_gradient_sync(enabled)


def train(cfg: HainaConfig, device: torch.device | None = None) -> TrainResult:
    """Train until ``cfg.train.steps``, resuming from the run directory's latest checkpoint if asked."""
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # bad layouts fail before any group
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device)
    mesh = build_mesh(layout, device.type)
    main = is_main_process()
    run_dir = Path(cfg.train.run_dir)
    checkpoints = run_dir / "checkpoints"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    tcfg = cfg.train
    algorithm = registry.get("algorithm", cfg.algorithm)(cfg)
    model = build_model(cfg, device)
    pipeline = None
    if layout.pp > 1:
        from haina.core.parallel.pipeline import build_pipeline

        pipeline = build_pipeline(model, mesh["pp"], cfg, layout, algorithm, device)
        parts = list(pipeline.model_parts)
    else:
        parts = [model]
    for part in parts:
        parallelize(part, mesh, layout, cfg)
    optimizers = [build_optimizer(part, cfg.optim) for part in parts]
    batches = algorithm.batches(cfg, run_dir, num_samples=tcfg.steps * layout.global_batch_size)

    state = TrainerState()
    latest = latest_checkpoint(checkpoints) if tcfg.resume else None
    if latest is not None:
        state = load_checkpoint(latest, parts, optimizers)

    metric_names = ["loss", *(registry.get("loss", name).metric for name in cfg.loss.terms)]
    dp_rank = _dp_rank(mesh, layout)
    pp_group = mesh["pp"].get_group() if layout.pp > 1 else None
    tokens_per_step = layout.global_batch_size * tcfg.seq_len
    flops_per_token = training_flops_per_token(cfg.model, tcfg.seq_len)
    peak = peak_tflops(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    metrics = MetricsWriter(run_dir, enabled=main)
    records: list[dict[str, Any]] = []
    last_loss = float("nan")
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    window: dict[str, float] = {}

    with _progress(tcfg.progress and main, tcfg.steps, state.step) as progress:
        while state.step < tcfg.steps:
            lr = lr_at(state.step, cfg.optim, tcfg.steps)
            for optimizer in optimizers:
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
            first = state.consumed_samples // tcfg.micro_batch_size  # in micro-batches of the whole run
            indices = [first + m * layout.dp + dp_rank for m in range(layout.grad_accum)]
            local = torch.zeros(len(metric_names) + 1, dtype=torch.float64, device=device)  # sums, count
            if pipeline is not None:
                pairs = [batches.batch(i) for i in indices]
                tokens = torch.cat([p[0] for p in pairs]).to(device)
                labels = torch.cat([p[1] for p in pairs]).to(device)
                with autocast:
                    result = pipeline.step(tokens, labels)
                if result.loss is not None:
                    local[0] = result.loss
                    for j, name in enumerate(metric_names[1:], start=1):
                        local[j] = float(result.parts[name])
                    local[-1] = 1
            else:
                for m, index in enumerate(indices):
                    _set_gradient_sync(parts, m == len(indices) - 1)
                    with autocast:
                        out = algorithm.loss(model, batches.batch(index))
                    (out.loss / layout.grad_accum).backward()
                    local[0] += out.loss.item() / layout.grad_accum
                    for j, name in enumerate(metric_names[1:], start=1):
                        local[j] += float(out.parts[name]) / layout.grad_accum
                local[-1] = 1
            grad_norm = clip_grad_norm([p for part in parts for p in part.parameters()], cfg.optim.clip_grad, pp_group)
            for optimizer in optimizers:
                optimizer.step()
            state.step += 1
            state.consumed_samples += layout.global_batch_size

            dist.all_reduce(local)  # every rank that saw a loss counts once: mean over dp (and tp copies)
            values = (local[:-1] / local[-1]).tolist()
            window_tokens += tokens_per_step
            window_steps += 1
            for name, value in zip(metric_names, values, strict=True):
                window[name] = window.get(name, 0.0) + value
            last_loss = values[0]

            if state.step % tcfg.log_every == 0 or state.step == tcfg.steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed / layout.world_size  # per device
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
                save_checkpoint(checkpoints, parts, optimizers, state)
            if progress is not None:
                progress.update(progress.task_ids[0], completed=state.step, status=f"loss {last_loss:.4f}")
    metrics.close()
    return TrainResult(run_dir=run_dir, steps=state.step, final_loss=last_loss, records=records)
