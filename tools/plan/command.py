"""``haina plan``: the command's work, called by :mod:`haina.tools.cli` with its parsed arguments.

    haina plan --config baichuan2-7b --nproc 8 --gpu h100-80gb [--mfu 0.4] [--json|--markdown] [--algorithms all]

One algorithm (the config's, or ``--algorithms NAME``): the per-rank table, step time and the verdict,
with the layouts that fit when it does not. Several (``--algorithms all`` or a comma list): one line per
algorithm. Bad input (unknown device, a layout the engine refuses, an MFU outside (0, 1]) is one line on
stderr and exit status 2, like every haina command.
"""

from __future__ import annotations

import argparse
import json
import sys

from haina.core.errors import ConfigError, HainaError


def _algorithms(value: str | None, default: str) -> list[str]:
    from haina.tools.plan.algorithms import ALGORITHMS

    if value is None:
        return [default]
    names = list(ALGORITHMS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in ALGORITHMS:
            raise ConfigError(f"--algorithms: unknown {name!r}; the planner knows {', '.join(ALGORITHMS)} (or all)")
    return names


def run_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from haina.core.config import load_config
    from haina.tools.plan.gpus import gpu
    from haina.tools.plan.memory import plan_memory
    from haina.tools.plan.report import (
        plan_markdown,
        print_plan,
        print_summary,
        summary_markdown,
        summary_row,
        to_json,
    )
    from haina.tools.plan.search import alternatives
    from haina.tools.plan.throughput import throughput

    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: must be in (0, 1]")
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: must be at least 1")
    target = gpu(args.gpu)
    cfg = load_config(args.config, args.overrides)
    names = _algorithms(args.algorithms, cfg.algorithm)
    console = Console(width=160, soft_wrap=False)
    options = {"reserve_gib": args.reserve_gib, "fragmentation": args.fragmentation}
    if len(names) > 1:
        rows = []
        for name in names:
            try:
                rows.append(summary_row(plan_memory(cfg, args.nproc, target, name, **options)))
            except HainaError as exc:  # one algorithm refusing the layout does not stop the others
                rows.append({"algorithm": name, "error": str(exc)})
        if args.json:
            print(json.dumps(rows))
        elif args.markdown:
            print(summary_markdown(rows))
        else:
            print_summary(rows, f"haina plan: {args.nproc} x {target.name}, {args.config} "
                                f"{' '.join(args.overrides)}".rstrip(), console)
        return 0
    plan = plan_memory(cfg, args.nproc, target, names[0], **options)
    speed = throughput(cfg, plan.layout, plan.workload, args.mfu, target.peak_tflops)
    alts = None if plan.fits else alternatives(cfg, args.nproc, target, names[0], top=args.top, **options)
    if args.json:
        print(json.dumps(to_json(plan, speed, alts)))
    elif args.markdown:
        print(plan_markdown(plan, speed, alts))
    else:
        print_plan(plan, speed, alts, console)
    sys.stdout.flush()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, required=True, help="ranks (GPUs) of the run")
    parser.add_argument("--gpu", required=True, help="device: h100-80gb, h200, a800-80gb, a100-80gb, a100-40gb, h800, ...")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the step time (default 0.4)")
    parser.add_argument("--algorithms", help="plan these algorithms (comma list, or all) instead of the config's")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument("--markdown", action="store_true", help="print the plan as Markdown tables (docs/plan.md)")
    parser.add_argument("--reserve-gib", type=float, default=2.0, help="per-rank runtime reserve: CUDA context, NCCL (2)")
    parser.add_argument("--fragmentation", type=float, default=0.05, help="allocator overhead over the tensors (0.05)")
    parser.add_argument("--top", type=int, default=8, help="how many fitting layouts to list when it does not fit")
