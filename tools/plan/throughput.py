"""FLOPs of one optimizer step and the step time they take at a given MFU.

Model FLOPs come from :func:`haina.core.metrics.training_flops_per_token`, the formula the training loop
divides by the peak for its logged MFU, so a planned MFU and a measured one mean the same thing. A forward
without backward is a third of it (the formula is forward + backward = 3 x forward); a value-head model
counts the formula with a one-row head. Recomputation (activation checkpointing) is hardware work the MFU
does not credit: it shows as a lower MFU at the same step time, so it is listed, not added. Decoding the
RL rollouts is bound by memory bandwidth, not FLOPs, and is left out of the step time (noted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from haina.core.config import HainaConfig, ModelConfig
from haina.core.metrics import training_flops_per_token
from haina.core.parallel.mesh import Layout
from haina.tools.plan.algorithms import Workload


@dataclass
class Throughput:
    """Per optimizer step over the whole world: FLOPs, tokens, and at ``mfu`` the time and tokens/s."""

    flops: float
    tokens: int
    recompute_flops: float
    mfu: float
    peak_tflops: float | None
    world: int
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float | None:
        if not self.peak_tflops:
            return None
        return self.flops / (self.world * self.peak_tflops * 1e12 * self.mfu)

    @property
    def tokens_per_s(self) -> float | None:
        step = self.step_s
        return None if step is None else self.tokens / step

    @property
    def tokens_per_s_per_gpu(self) -> float | None:
        rate = self.tokens_per_s
        return None if rate is None else rate / self.world


def _per_token(model: ModelConfig, seq: int) -> float:
    if model.head == "value":
        model = model.model_copy(update={"vocab_size": 1})
    return training_flops_per_token(model, seq)


def throughput(cfg: HainaConfig, layout: Layout, w: Workload, mfu: float, peak_tflops: float | None) -> Throughput:
    """FLOPs of one step of workload ``w``: trained models forward + backward (``epochs`` times for RL),
    frozen models (and RL's scoring passes) forward only."""
    ranks_rows = layout.dp  # data-parallel ranks, each with its own rows
    seq = w.seq
    notes: list[str] = []
    if w.rollout_rows:
        tokens = w.step_rows * ranks_rows * seq  # the step's rollout rows, each up to seq tokens
        flops = 0.0
        for role in w.trained:
            flops += w.epochs * _per_token(role.model, seq) * tokens
        scoring = [r for r in w.roles if not r.trained] + [r for r in w.trained]  # old log-probs, values
        flops += sum(_per_token(r.model, seq) / 3 * tokens for r in scoring)
        notes.append("rollout decoding excluded from the step time (bandwidth-bound)")
    else:
        tokens = layout.global_batch_size * seq * w.rows_per_sample
        flops = sum(_per_token(r.model, seq) * tokens for r in w.trained)
        flops += sum(_per_token(r.model, seq) / 3 * tokens for r in w.frozen)
    mode = cfg.parallel.activation_checkpoint
    recompute = 0.0
    if mode == "full":
        recompute = sum(_per_token(r.model, seq) / 3 * tokens for r in w.trained) * w.epochs
        notes.append(f"full checkpointing recomputes each forward: +{recompute / flops:.0%} hardware FLOPs")
    return Throughput(flops, tokens, recompute, mfu, peak_tflops, layout.world_size, notes)
