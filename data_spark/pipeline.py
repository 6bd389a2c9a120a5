"""The job runner: stages in the report's order, each materialised to Parquet, committed by one rename.

Every stage reads the previous stage's Parquet and writes its own under a temporary folder beside the
output, so lineage stays short, a stage's Python runs once, and a killed run leaves only a hidden
temporary folder; the final ``rename`` makes the output appear complete or not at all.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from haina.data_spark.config import PrepareConfig, dump_prepare_config
from haina.data_spark.ingest import check_inputs, documents, quarantined, read_inputs
from haina.data_spark.shards import blend_summary, write_shards
from haina.data_spark.stages import (
    category,
    embedding,
    exact_dedup,
    heuristics,
    line_dedup,
    near_dedup,
    quality,
    safety,
    weighting,
)
from haina.data_spark.stages.base import StageContext, StageResult

StageFn = Callable[[DataFrame, StageContext], StageResult]

# (name, run, config section with ``enabled`` or None when the stage always runs)
STAGES: list[tuple[str, StageFn, str | None]] = [
    ("exact_dedup", exact_dedup.run, "exact_dedup"),
    ("heuristics", heuristics.run, "heuristics"),
    ("quality", quality.run, "quality"),
    ("line_dedup", line_dedup.run, "line_dedup"),
    ("near_dedup", near_dedup.run, "near_dedup"),
    ("embedding", embedding.run, "embedding"),
    ("safety", safety.run, "safety"),
    ("category", category.run, None),
    ("weighting", weighting.run, None),
]


class Progress:
    """One spinner per stage and one summary line when it ends, on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, quiet=not enabled)
        self.enabled = enabled

    def stage(self, name: str):
        return self.console.status(f"[bold]{name}[/]…") if self.enabled else nullcontext()

    def done(self, name: str, row: dict[str, Any]) -> None:
        if row.get("skipped"):
            self.console.print(f"[dim]- {name}: skipped[/]")
            return
        self.console.print(
            f"[green]✓[/] {name:<12} {row['docs_in']:>8,} → {row['docs_out']:>8,} docs  "
            f"{row['tokens_in']:>11,} → {row['tokens_out']:>11,} tokens  {row['seconds']:.1f}s"
        )


def _counts(df: DataFrame) -> tuple[int, int]:
    row = df.agg(F.count("*").alias("n"), F.sum("ntok").alias("t")).collect()[0]
    return int(row["n"]), int(row["t"] or 0)


def _write(df: DataFrame, path: Path, partitions: int) -> None:
    """Materialise in a canonical layout (hash of row id, sorted), so the next stage's input, and with it
    order-sensitive steps such as k-means initialisation, do not depend on shuffle timing."""
    df.repartition(partitions, "row_id").sortWithinPartitions("row_id").write.mode("overwrite").parquet(str(path))


def _prepare_output(output: Path, overwrite: bool) -> Path:
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise ValueError(f"{output}: output exists (set overwrite=true to replace it)")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, output: Path) -> None:
    """Swap the finished temporary folder in; an old output is moved aside first and deleted last."""
    trash = None
    if output.exists():
        trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(trash)
    tmp.rename(output)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _quarantine_summary(df: DataFrame) -> dict[str, int]:
    kind = F.trim(F.regexp_extract("reason", r"^([^(0-9]+)", 1))
    rows = df.groupBy(kind.alias("k")).count().orderBy("k").collect()
    return {r["k"]: int(r["count"]) for r in rows}


def run_pipeline(
    spark: SparkSession, inputs: list[Path], output: Path, cfg: PrepareConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Run every enabled stage on ``inputs`` and commit ``output``; returns the report."""
    inputs = check_inputs(inputs)
    output = Path(output).resolve()
    tmp = _prepare_output(output, cfg.overwrite)
    bar = Progress(progress)
    started = time.perf_counter()
    try:
        report = _run(spark, inputs, tmp, cfg, bar)
        report["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        spark.catalog.clearCache()
    report["output"] = str(output)
    return report


def _run(spark: SparkSession, inputs: list[Path], tmp: Path, cfg: PrepareConfig, bar: Progress) -> dict[str, Any]:
    (tmp / "config.yaml").write_text(dump_prepare_config(cfg), encoding="utf-8")
    stages_dir = tmp / "stages"
    ctx = StageContext(spark, cfg, tmp)
    with bar.stage("ingest"):
        t0 = time.perf_counter()
        parsed_path = tmp / "_parsed"
        # Parse once: documents and quarantine are both cut from this materialised table.
        read_inputs(spark, inputs, cfg).write.mode("overwrite").parquet(str(parsed_path))
        parsed = spark.read.parquet(str(parsed_path))
        _write(documents(parsed), stages_dir / "00_ingest", cfg.spark.shuffle_partitions)
        quarantined(parsed).write.mode("overwrite").parquet(str(tmp / "quarantine"))
        shutil.rmtree(parsed_path, ignore_errors=True)
        current = spark.read.parquet(str(stages_dir / "00_ingest"))
        docs_raw, tokens_raw = _counts(current)
        bad = spark.read.parquet(str(tmp / "quarantine"))
        ingest = {"inputs": [str(p) for p in inputs], "documents": docs_raw, "tokens": tokens_raw,
                  "quarantined": bad.count(), "quarantine_reasons": _quarantine_summary(bad),
                  "seconds": round(time.perf_counter() - t0, 2)}
    bar.console.print(
        f"[green]✓[/] {'ingest':<12} {docs_raw:>8,} docs, {ingest['quarantined']:,} quarantined  {ingest['seconds']:.1f}s"
    )
    stages: list[dict[str, Any]] = []
    docs_in, tokens_in = docs_raw, tokens_raw
    for index, (name, run, section) in enumerate(STAGES, start=1):
        if section is not None and not getattr(cfg, section).enabled:
            row = {"stage": name, "skipped": True}
            stages.append(row)
            bar.done(name, row)
            continue
        with bar.stage(name):
            t0 = time.perf_counter()
            result = run(current, ctx)
            path = stages_dir / f"{index:02d}_{name}"
            _write(result.kept, path, cfg.spark.shuffle_partitions)
            removed_docs = removed_tokens = 0
            if result.removed is not None:
                result.removed.write.mode("overwrite").parquet(str(tmp / "removed" / f"stage={name}"))
                removed_docs, removed_tokens = _counts(spark.read.parquet(str(tmp / "removed" / f"stage={name}")))
            spark.catalog.clearCache()
            current = spark.read.parquet(str(path))
            docs_out, tokens_out = _counts(current)
            row = {
                "stage": name, "docs_in": docs_in, "docs_out": docs_out, "docs_removed": removed_docs,
                "tokens_in": tokens_in, "tokens_out": tokens_out, "tokens_removed_with_docs": removed_tokens,
                "tokens_removed_in_docs": tokens_in - tokens_out - removed_tokens,
                "share_of_raw_tokens_removed": round((tokens_in - tokens_out) / tokens_raw, 6) if tokens_raw else 0.0,
                "seconds": round(time.perf_counter() - t0, 2), **result.notes,
            }
        stages.append(row)
        bar.done(name, row)
        docs_in, tokens_in = docs_out, tokens_out
    internal = [c for c in current.columns if c.startswith("_")]
    current.drop(*internal).write.mode("overwrite").parquet(str(tmp / "kept"))
    if not (tmp / "removed").exists():
        spark.createDataFrame([], "row_id long, reason string").write.parquet(str(tmp / "removed" / "stage=none"))
    report: dict[str, Any] = {
        "token_unit": "approx (words + CJK characters + symbols) until tokenized",
        "ingest": ingest, "stages": stages,
        "kept": {"documents": docs_in, "tokens": tokens_in,
                 "share_of_raw_tokens": round(tokens_in / tokens_raw, 6) if tokens_raw else 0.0},
    }
    if cfg.tokenize.model is not None:
        with bar.stage("tokenize"):
            t0 = time.perf_counter()
            blend = write_shards(spark, spark.read.parquet(str(tmp / "kept")), tmp, cfg.tokenize.model,
                                 partitions=cfg.tokenize.partitions, append_eos=cfg.tokenize.append_eos)
            report["tokenized"] = {"categories": blend_summary(blend), "seconds": round(time.perf_counter() - t0, 2)}
        bar.console.print(f"[green]✓[/] {'tokenize':<12} {sum(d['tokens'] for d in blend['datasets']):,} tokens "
                          f"in {len(blend['datasets'])} parts")
    if not cfg.keep_intermediate:
        shutil.rmtree(stages_dir, ignore_errors=True)
    return report
