"""The training loop: one optimizer step at a time, under any parallel layout.

What a step computes is the algorithm plugin's business (:class:`haina.core.algorithm.Algorithm`:
pretrain, sft, rm, dpo, ppo, third parties'); this loop owns everything around it: process group and
mesh, seeding, per-rank data, the schedule, clipping, metrics, progress, saving and resuming. One process
is a world of one, so there is one code path.

Reliability: checkpoints are atomic and written in the background (:class:`CheckpointManager`); a run
resumes from ``latest`` by default; SIGTERM/SIGINT checkpoint at the end of the step and exit with
128 + signal (:mod:`haina.core.preempt`); a non-finite or spiking loss skips the update and repeated bad
steps roll back to the last checkpoint past the bad data (:mod:`haina.core.guard`), all logged as
events in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from haina.core import collectives, faults
from haina.core.algorithm import Algorithm, algorithm_class, check_algorithm
from haina.core.checkpoint import (
    CheckpointManager,
    TrainerState,
    latest_checkpoint,
)
from haina.core.config import HainaConfig, dump_config
from haina.core.distributed import default_device, init_distributed, is_main_process
from haina.core.engine import Engine
from haina.core.guard import KINDS, NONFINITE_GRAD, OK, SpikeGuard, agree
from haina.core.metrics import MetricsWriter, peak_tflops, training_flops_per_token, truncate_metrics
from haina.core.optim import build_optimizer, lr_at
from haina.core.parallel.activation_checkpoint import apply_activation_checkpointing
from haina.core.parallel.mesh import Layout, build_mesh, resolve_layout
from haina.core.parallel.zero import ZeroEngine, build_partitioned
from haina.core.placement import lay_out
from haina.core.preempt import Preempted, Preemption
from haina.core.tokenizer import check_tokenizers


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    records: list[dict[str, Any]]


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


def _forward_backward(
    engine: Engine, algorithm: Algorithm, pipeline: Any, micro_batches: list, names: list[str], poison: float = 1.0,
) -> tuple[dict[str, float] | None, torch.Tensor | None]:
    """Backpropagate the algorithm's loss over this rank's micro-batches but the last; (metrics, the last
    micro-batch's scaled loss, for :meth:`Engine.update` to backpropagate once the guard has seen the loss).

    Metrics are None on pipeline ranks that do not hold the last stage (they see no loss); a pipeline
    step does its whole backward itself. ``poison`` (a test fault) multiplies the loss (NaN, or a spike).
    """
    layout = engine.layout
    values: dict[str, float] | None = None
    if pipeline is not None:
        tokens = torch.cat([b[0] for b in micro_batches]).to(engine.device)
        labels = torch.cat([b[1] for b in micro_batches]).to(engine.device)
        with engine.autocast:
            result = pipeline.step(tokens, labels)
        if result.loss is not None:
            values = {"loss": float(result.loss), **{n: float(result.parts[n]) for n in names[1:]}}
        return values, None
    values = dict.fromkeys(names, 0.0)
    pending = None
    for m, batch in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        engine.mark_accumulation_boundary(last)
        with engine.autocast:
            out = engine.forward_loss(algorithm.loss, batch)
        loss = (out.loss * poison if poison != 1.0 else out.loss) / layout.grad_accum
        values["loss"] += loss.item()
        for name in names[1:]:
            values[name] += float(out.parts[name]) / layout.grad_accum
        if last:
            pending = loss
        else:
            engine.backward(loss)
    return values, pending


def _reduce_metrics(values: dict[str, float] | None, names: list[str]) -> list[float]:
    """Mean over the ranks that have metrics (every dp rank; tp copies count alike)."""
    local = [*(values[n] for n in names), 1.0] if values is not None else [0.0] * (len(names) + 1)
    total = collectives.reduce_values(local)
    return (total[:-1] / total[-1]).tolist()


def train(cfg: HainaConfig, device: torch.device | None = None) -> TrainResult:
    """Train until ``cfg.train.steps``, resuming from the run directory's latest checkpoint if asked."""
    check_algorithm(cfg)
    layout = resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # bad layouts fail before any group
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_distributed(device, cfg.parallel.collective_timeout_s)
    mesh = build_mesh(layout, device.type)
    main = is_main_process()
    run_dir = Path(cfg.train.run_dir)
    checkpoints = run_dir / "checkpoints"
    if main:
        for note in check_tokenizers(cfg):  # checked before any group; the notes once the run has started
            print(f"haina: note: {note}", file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")

    tcfg = cfg.train
    algorithm = algorithm_class(cfg)(cfg)
    torch.manual_seed(tcfg.seed)
    model = algorithm.build_model(cfg, torch.device("meta"))  # cut on meta; only this rank's shards materialise
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16")
    dp_rank = _dp_rank(mesh, layout)
    pipeline = None
    if cfg.parallel.dp_backend == "deepspeed":
        build_partitioned(model, cfg, layout, device)  # ZeRO-3: partitioned module by module as it is built
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint, cfg.model.attention, device.type)
        engine: Engine = ZeroEngine(cfg, layout, mesh, device, [model], [], autocast, None, dp_rank)
    else:
        parts, pipeline = lay_out(model, cfg, layout, mesh, device, stage_loss=algorithm)
        del model  # a pipeline stage holds only its share of the (meta) model it was cut from
        optimizers = [build_optimizer(part, cfg.optim) for part in parts]
        pp_group = mesh["pp"].get_group() if layout.pp > 1 else None
        engine = Engine(cfg, layout, mesh, device, parts, optimizers, autocast, pp_group, dp_rank)

    state = TrainerState()
    manager = CheckpointManager(checkpoints, tcfg.keep_checkpoints, tcfg.async_save)
    guard = SpikeGuard(tcfg.guard)
    latest = latest_checkpoint(checkpoints) if tcfg.resume else None
    algorithm.setup(engine, resumed=latest is not None)
    if cfg.parallel.dp_backend == "deepspeed":
        engine.attach()  # after setup: the weights are loaded before ZeRO shards them
    if latest is not None:
        state = engine.load(latest)
        guard.load_state_dict(state.guard)
    if main:
        truncate_metrics(run_dir, state.step)  # steps after the checkpoint (if any) are computed again
    batches = algorithm.batches(cfg, run_dir, num_samples=tcfg.steps * layout.global_batch_size)

    names = ["loss", *algorithm.metric_names(cfg)]
    tokens_per_step = layout.global_batch_size * tcfg.seq_len
    flops_per_token = training_flops_per_token(cfg.model, tcfg.seq_len)
    peak = peak_tflops(device)
    metrics = MetricsWriter(run_dir, enabled=main)
    records: list[dict[str, Any]] = []
    last_loss = float("nan")
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    window: dict[str, float] = {}
    rank = dist.get_rank()

    try:
        with Preemption() as preemption, _progress(tcfg.progress and main, tcfg.steps, state.step) as progress:
            while state.step < tcfg.steps:
                manager.poll()
                lr = lr_at(state.step, cfg.optim, tcfg.steps)
                engine.set_lr(lr)
                engine.zero_grad()
                first = state.consumed_samples // tcfg.micro_batch_size  # in micro-batches of the whole run
                micro_batches = [batches.batch(first + m * layout.dp + dp_rank) for m in range(layout.grad_accum)]
                if algorithm.owns_step:
                    skipped_before = engine.skipped_updates
                    values = algorithm.train_step(engine, state.step, micro_batches)
                    grad_norm = values.pop("grad_norm", float("nan"))
                    names = ["loss", *sorted(k for k in values if k != "loss")]
                    reduced = _reduce_metrics(values, names)
                    verdict = guard.verdict(reduced[0], 0.0, spikes=False)  # the algorithm made the update
                    if engine.skipped_updates > skipped_before:
                        verdict = NONFINITE_GRAD
                    verdict = agree(verdict)
                else:
                    batch_number = state.consumed_samples // layout.global_batch_size + 1  # of the data, 1-based
                    poison = faults.LOSS_FACTORS.get(faults.action("loss", batch_number, rank), 1.0)
                    values, pending = _forward_backward(engine, algorithm, pipeline, micro_batches, names, poison)
                    reduced = _reduce_metrics(values, names)
                    grad_norm, verdict = engine.update(pending, reduced[0], guard)
                state.step += 1
                state.consumed_samples += layout.global_batch_size
                rollback = guard.record(reduced[0], verdict)
                if verdict != OK:
                    metrics.event(
                        KINDS[verdict], state.step, loss=reduced[0], grad_norm=float(grad_norm),
                        update="algorithm's" if algorithm.owns_step else "skipped",
                        bad_streak=guard.bad_streak,
                    )
                faults.fire("step_end", state.step, rank)
                window_tokens += tokens_per_step
                window_steps += 1
                for name, value in zip(names, reduced, strict=True):
                    window[name] = window.get(name, 0.0) + value
                last_loss = reduced[0]

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
                if rollback:
                    state = _roll_back(engine, manager, checkpoints, state, guard, metrics)
                    window_start, window_tokens, window_steps, window = time.perf_counter(), 0, 0, {}
                    continue
                if state.step % tcfg.save_every == 0 or state.step == tcfg.steps:
                    state.guard = guard.state_dict()
                    engine.save(manager, state)
                if progress is not None:
                    progress.update(progress.task_ids[0], completed=state.step, status=f"loss {last_loss:.4f}")
                signum = preemption.requested()
                if signum:
                    _preempt(engine, manager, state, guard, metrics, signum, checkpoints)
        manager.close()
    finally:
        metrics.close()
    algorithm.finish(engine, run_dir)
    return TrainResult(run_dir=run_dir, steps=state.step, final_loss=last_loss, records=records)


def _roll_back(
    engine: Engine, manager: CheckpointManager, checkpoints: Path, state: TrainerState, guard: SpikeGuard,
    metrics: MetricsWriter,
) -> TrainerState:
    """Reload the last checkpoint but keep the data position: the bad batches are not seen again."""
    manager.wait()
    collectives.barrier()
    target = latest_checkpoint(checkpoints)
    if target is None:
        raise RuntimeError(
            f"{guard.bad_streak} bad steps in a row at step {state.step} and no checkpoint to roll back to"
        )
    restored = engine.load(target)
    metrics.event(
        "rollback", state.step, to_step=restored.step, checkpoint=target.name,
        skipped_samples=state.consumed_samples - restored.consumed_samples,
    )
    guard.bad_streak = 0
    return TrainerState(step=restored.step, consumed_samples=state.consumed_samples, guard=guard.state_dict())


def _preempt(
    engine: Engine, manager: CheckpointManager, state: TrainerState, guard: SpikeGuard, metrics: MetricsWriter,
    signum: int, checkpoints: Path,
) -> None:
    """Checkpoint this step (unless just saved), wait for it, log, and leave with 128 + signal."""
    if manager.last_saved_step != state.step:
        state.guard = guard.state_dict()
        engine.save(manager, state, block=True)
    manager.close()
    collectives.barrier()
    preempted = Preempted(signum, state.step)
    metrics.event("preempted", state.step, signal=signum, exit_code=preempted.code,
                  checkpoint=f"step_{state.step}")
    if is_main_process():
        print(f"haina: preempted by signal {signum} after step {state.step}; checkpoint "
              f"{checkpoints / f'step_{state.step}'} saved; exiting with {preempted.code}", file=sys.stderr)
    raise preempted
