"""The end-to-end demo on embedded data: corpus -> Spark data preparation -> tokenizer -> weighted
.bin/.idx shards -> pretraining -> loss plot -> SFT, reward model, PPO.

Everything it reads ships with Python or with installed packages, so it runs on a machine with no
network; it is sized for a few minutes on two CPU cores.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from haina.core.config import load_config
from haina.core.metrics import read_metrics
from haina.core.train import train
from haina.data_spark.prepare import kept_files, prepare_main, tokenize_main
from haina.tools.demo.align import run_alignment_demo
from haina.tools.demo.corpus import build_corpus
from haina.tools.demo.size import FULL, DemoSize
from haina.tools.tokenizer import compression_report, format_report, train_tokenizer


def plot_loss(records: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="loss (lm + max-z)")
    ax.plot(steps, [r["lm_loss"] for r in records], label="lm_loss", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run_demo(
    workdir: Path, overrides: Sequence[str] = (), align: bool = True, size: DemoSize = FULL
) -> dict[str, Any]:
    from importlib import resources

    console = Console()
    workdir.mkdir(parents=True, exist_ok=True)
    for old in ("run", "run-sft", "run-rm", "run-ppo", "run-grpo"):
        shutil.rmtree(workdir / old, ignore_errors=True)  # a demo starts over rather than resuming
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def phase(name: str) -> None:
        timings[name] = time.perf_counter() - started - sum(timings.values())

    console.rule("[bold]1. corpus (English docs, stdlib code, Chinese text; shipped with installed packages)")
    corpus = build_corpus(workdir / "corpus", max_mb=size.corpus_mb)
    phase("corpus")

    console.rule("[bold]2. data preparation on Spark (dedup, quality, safety, categories, weights)")
    job_config = resources.files("haina.data_spark") / "resources" / "demo.yaml"
    with resources.as_file(job_config) as job_yaml:
        prepared = workdir / "prepared"
        report = prepare_main([corpus["train"]], prepared, job_yaml, overrides=["overwrite=true"])
    console.print(_stage_table(report))
    phase("prepare")

    console.rule("[bold]3. tokenizer (SentencePiece BPE, Baichuan 2 settings) on the kept documents")
    overrides = [*size.pretrain, *overrides]
    base = load_config("demo", overrides)
    tokenizer = train_tokenizer(kept_files(prepared), workdir / "tokenizer" / "haina", base.tokenizer)
    compression = compression_report(tokenizer, corpus["heldout"])
    console.print(format_report(compression))
    phase("tokenizer")

    console.rule("[bold]4. tokenize in Spark into weighted shards + blend.json")
    with resources.as_file(job_config) as job_yaml:
        stats = tokenize_main(prepared, tokenizer, job_yaml)
    console.print(stats)
    phase("tokenize")

    console.rule("[bold]5. pretrain from the blend")
    cfg = load_config(
        "demo",
        [
            *overrides,
            f"data.blend={json.dumps(stats['blend'])}",
            f"data.tokenizer={json.dumps(str(tokenizer))}",
            f"train.run_dir={json.dumps(str(workdir / 'run'))}",
        ],
    )
    result = train(cfg)
    phase("pretrain")

    records = read_metrics(result.run_dir)
    plot = plot_loss(records, workdir / "loss.png", f"haina demo: {cfg.model.num_layers}x{cfg.model.hidden_size}")
    table = Table(title="demo summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("first logged loss", f"{records[0]['loss']:.3f} (step {records[0]['step']})")
    table.add_row("final loss", f"{records[-1]['loss']:.3f} (step {records[-1]['step']})")
    table.add_row("tokenizer tokens/byte (heldout)", f"{compression['tokens_per_byte']:.3f}")
    for name, seconds in timings.items():
        table.add_row(f"time: {name}", f"{seconds:.1f} s")
    table.add_row("loss plot", str(plot))
    table.add_row("run directory", str(result.run_dir))
    console.print(table)
    summary = {
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "tokens_per_byte": compression["tokens_per_byte"],
        "kept_documents": report["kept"]["documents"],
        "timings_s": timings,
        "loss_plot": str(plot),
        "run_dir": str(result.run_dir),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not records[-1]["loss"] < records[0]["loss"]:
        raise RuntimeError("the demo's loss did not fall")
    if align:
        summary["alignment"] = run_alignment_demo(workdir, result.run_dir, console, size)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stage_table(report: dict[str, Any]) -> Table:
    """The job's report as a table: documents and (approximate) tokens in and out of every stage."""
    table = Table(title=f"data preparation ({report['ingest']['quarantined']} lines quarantined)")
    for column in ("stage", "docs in", "docs out", "tokens in", "tokens out", "seconds"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in report["stages"]:
        if row.get("skipped"):
            table.add_row(row["stage"], "skipped", "", "", "", "")
            continue
        table.add_row(row["stage"], f"{row['docs_in']:,}", f"{row['docs_out']:,}", f"{row['tokens_in']:,}",
                      f"{row['tokens_out']:,}", f"{row['seconds']:.1f}")
    return table
