"""The planner's output: a table of the peak phase's terms, the verdict line, and the same as JSON."""

from __future__ import annotations

import math
from typing import Any

from haina.tools.plan.gpus import GIB
from haina.tools.plan.memory import MemoryPlan
from haina.tools.plan.search import Candidate
from haina.tools.plan.throughput import Throughput


def _gib(x: float) -> float:
    return round(x / GIB, 3)


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def to_json(plan: MemoryPlan, speed: Throughput, alternatives: list[Candidate] | None = None) -> dict[str, Any]:
    """A stable, flat description of the plan (GiB rounded to MiB precision)."""
    worst = plan.worst
    capacity = plan.target.memory_gib
    return {
        "algorithm": plan.workload.algorithm,
        "layout": {k: getattr(plan.layout, k) for k in ("pp", "dp_replicate", "dp_shard", "tp", "grad_accum",
                                                        "global_batch_size")},
        "world": plan.layout.world_size,
        "gpu": {"name": plan.target.name, "memory_gib": capacity if math.isfinite(capacity) else None,
                "peak_tflops": plan.target.peak_tflops},
        "models": [{"name": r.name, "trained": r.trained, "head": r.model.head} for r in plan.workload.roles],
        "ranks": [{"pp_rank": r.pp_rank, "trained_parameters": r.trained_parameters,
                   "frozen_parameters": r.frozen_parameters, "peak_phase": r.peak.name,
                   "peak_gib": _gib(r.peak.total)} for r in plan.ranks],
        "worst_pp_rank": worst.pp_rank,
        "phases": [{"name": ph.name, "total_gib": _gib(ph.total),
                    "terms": [{"name": t.name, "gib": _gib(t.bytes), "note": t.note} for t in ph.terms]}
                   for ph in worst.phases],
        "host": [{"name": t.name, "gib": _gib(t.bytes), "note": t.note} for t in worst.host],
        "tensors_gib": _gib(plan.tensors_bytes),
        "reserve_gib": _gib(plan.reserve_bytes),
        "fragmentation": plan.fragmentation,
        "needed_gib": _gib(plan.needed_bytes),
        "fits": plan.fits,
        "verdict": plan.verdict(),
        "flops_per_step": speed.flops,
        "tokens_per_step": speed.tokens,
        "mfu": speed.mfu,
        "step_s": speed.step_s,
        "tokens_per_s": speed.tokens_per_s,
        "tokens_per_s_per_gpu": speed.tokens_per_s_per_gpu,
        "notes": [*plan.notes, *speed.notes],
        "fitting_layouts": [{"overrides": list(c.overrides), "needed_gib": round(c.needed_gib, 3)}
                            for c in alternatives or []],
    }


def print_plan(plan: MemoryPlan, speed: Throughput, alternatives: list[Candidate] | None, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    worst, peak = plan.worst, plan.worst.peak
    w, layout = plan.workload, plan.layout
    models = ", ".join(f"{r.name}{'' if r.trained else ' (frozen)'}" for r in w.roles)
    rank = f", pipeline rank {worst.pp_rank} of {layout.pp}" if layout.pp > 1 else ""
    table = Table(title=f"haina plan: {w.algorithm} on {layout.world_size} x {plan.target.name} — {layout.describe()}, "
                        f"{layout.grad_accum} micro-batches per step{rank}")
    table.add_column(f"per rank, at the peak ({peak.name})")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for t in peak.terms:
        table.add_row(escape(t.name), f"{t.bytes / GIB:.2f}", escape(t.note))
    table.add_row("[b]tensors at the peak[/b]", f"[b]{peak.total / GIB:.2f}[/b]", "what max_memory_allocated would report")
    if plan.reserve_bytes or plan.fragmentation:
        table.add_row("allocator fragmentation", f"{peak.total * plan.fragmentation / GIB:.2f}", f"{plan.fragmentation:.0%} of the tensors")
        table.add_row("runtime reserve", f"{plan.reserve_bytes / GIB:.2f}", "CUDA context, cuBLAS workspace, NCCL buffers")
    table.add_row("[b]needed[/b]", f"[b]{plan.needed_bytes / GIB:.2f}[/b]", "")
    console.print(table)
    phases = "; ".join(f"{ph.name} {ph.total / GIB:.1f}" for ph in worst.phases)
    console.print(f"models: {models}")
    console.print(f"phases (GiB of tensors): {phases}")
    if layout.pp > 1:
        console.print("pipeline ranks (GiB at peak): " + ", ".join(f"{r.pp_rank}: {r.peak.total / GIB:.1f}" for r in plan.ranks))
    console.print(f"parameters on this rank: {_si(worst.trained_parameters)} trained, {_si(worst.frozen_parameters)} frozen")
    for t in worst.host:
        console.print(f"host memory per rank: {t.name} {t.bytes / GIB:.2f} GiB ({t.note})")
    if speed.step_s is not None:
        console.print(f"per step: {_si(speed.flops)}FLOP, {_si(speed.tokens)} tokens; at MFU {speed.mfu:.0%} of "
                      f"{speed.peak_tflops:.0f} TFLOPS: {speed.step_s:.2f} s/step, {_si(speed.tokens_per_s or 0)} tokens/s "
                      f"({speed.tokens_per_s_per_gpu:,.0f} per GPU)")
    for note in [*plan.notes, *speed.notes]:
        console.print(f"note: {escape(note)}")
    console.print(f"[b]{plan.verdict()}[/b]")
    if not plan.fits:
        if alternatives:
            alt = Table(title=f"layouts of {layout.world_size} ranks that fit")
            alt.add_column("overrides")
            alt.add_column("needed GiB", justify="right")
            for c in alternatives:
                alt.add_row(" ".join(c.overrides), f"{c.needed_gib:.1f}")
            console.print(alt)
        elif alternatives is not None:
            console.print(f"no layout of {layout.world_size} ranks fits this model and batch; use more ranks or a smaller micro-batch")


def summary_row(plan: MemoryPlan) -> dict[str, Any]:
    worst = plan.worst
    return {"algorithm": plan.workload.algorithm, "trained_parameters": worst.trained_parameters,
            "frozen_parameters": worst.frozen_parameters, "peak_phase": worst.peak.name,
            "tensors_gib": _gib(plan.tensors_bytes), "needed_gib": _gib(plan.needed_bytes), "fits": plan.fits,
            "verdict": plan.verdict()}


def print_summary(rows: list[dict[str, Any]], title: str, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for col in ("algorithm", "trained / frozen params per rank", "peak phase", "tensors GiB", "needed GiB", "verdict"):
        table.add_column(col, justify="right" if "GiB" in col else "left")
    for r in rows:
        if "error" in r:
            table.add_row(r["algorithm"], "", "", "", "", escape(f"refused: {r['error']}"))
            continue
        table.add_row(r["algorithm"], f"{_si(r['trained_parameters'])} / {_si(r['frozen_parameters'])}", r["peak_phase"],
                      f"{r['tensors_gib']:.1f}", f"{r['needed_gib']:.1f}", r["verdict"])
    console.print(table)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The per-algorithm summary as a Markdown table (what docs/plan.md holds)."""
    lines = ["| algorithm | trained / frozen parameters per rank | peak at | tensors GiB | needed GiB | verdict |",
             "|---|---|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | | | | | refused: {r['error']} |")
            continue
        lines.append(f"| {r['algorithm']} | {_si(r['trained_parameters'])} / {_si(r['frozen_parameters'])} | "
                     f"{r['peak_phase']} | {r['tensors_gib']:.1f} | {r['needed_gib']:.1f} | {r['verdict']} |")
    return "\n".join(lines)


def plan_markdown(plan: MemoryPlan, speed: Throughput, alternatives: list[Candidate] | None) -> str:
    """One plan as Markdown: the peak moment's terms, the other moments, speed, notes, verdict."""
    worst, peak = plan.worst, plan.worst.peak
    lines = [f"{plan.workload.algorithm} on {plan.layout.world_size} x {plan.target.name}, {plan.layout.describe()}, "
             f"{plan.layout.grad_accum} micro-batches per step"
             + (f" (worst: pipeline rank {worst.pp_rank})" if plan.layout.pp > 1 else ""), "",
             f"| per rank at the peak ({peak.name}) | GiB | what |", "|---|---:|---|"]
    lines += [f"| {t.name} | {t.bytes / GIB:.2f} | {t.note} |" for t in peak.terms]
    lines.append(f"| **tensors at the peak** | **{peak.total / GIB:.2f}** | |")
    if plan.reserve_bytes or plan.fragmentation:
        lines.append(f"| allocator fragmentation | {peak.total * plan.fragmentation / GIB:.2f} | {plan.fragmentation:.0%} |")
        lines.append(f"| runtime reserve | {plan.reserve_bytes / GIB:.2f} | CUDA context, NCCL |")
    lines += [f"| **needed** | **{plan.needed_bytes / GIB:.2f}** | |", "",
              "Moments (GiB of tensors): " + "; ".join(f"{ph.name} {ph.total / GIB:.1f}" for ph in worst.phases) + "."]
    if plan.layout.pp > 1:
        lines.append("Pipeline ranks (GiB at their peak): "
                     + ", ".join(f"{r.pp_rank}: {r.peak.total / GIB:.1f}" for r in plan.ranks) + ".")
    if speed.step_s is not None:
        lines.append(f"Per step {_si(speed.flops)}FLOP, {_si(speed.tokens)} tokens; at MFU {speed.mfu:.0%}: "
                     f"{speed.step_s:.2f} s/step, {_si(speed.tokens_per_s or 0)} tokens/s "
                     f"({speed.tokens_per_s_per_gpu:,.0f} per GPU).")
    lines += [f"Note: {n}." for n in [*plan.notes, *speed.notes]]
    lines.append(f"**{plan.verdict()}**")
    if not plan.fits and alternatives:
        lines += ["", "| layouts that fit | needed GiB |", "|---|---:|"]
        lines += [f"| `{' '.join(c.overrides)}` | {c.needed_gib:.1f} |" for c in alternatives]
    elif not plan.fits and alternatives is not None:
        lines.append(f"No layout of {plan.layout.world_size} ranks fits this model and batch.")
    return "\n".join(lines)
