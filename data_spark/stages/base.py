"""What every stage receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from haina.data_spark.config import PrepareConfig

REMOVED_COLUMNS = ["row_id", "doc_id", "source", "kind", "ntok", "text", "reason", "dup_of"]
BROADCAST_ROWS = 2_000_000  # rows of a narrow table (ids, keys) that a join sends to every task instead of shuffling


@dataclass
class StageContext:
    """Spark, the config, and a private folder (under the temporary output) for models a stage trains."""

    spark: SparkSession
    cfg: PrepareConfig
    workdir: Path
    notes: dict[str, object] = field(default_factory=dict)
    following: str | None = None  # the stage the job runs next (None: the last, or a stage run on its own)
    near_keys: DataFrame | None = None  # (row_id, near-dedup columns) of the documents as ingested


@dataclass
class StageResult:
    kept: DataFrame
    removed: DataFrame | None = None
    notes: dict[str, object] = field(default_factory=dict)


def removed_rows(df: DataFrame, reason: Column, dup_of: Column | None = None) -> DataFrame:
    """Project removed documents onto the removed-table schema (stage is added by the runner)."""
    return df.select(
        "row_id", "doc_id", "source", "kind", "ntok", "text",
        reason.cast("string").alias("reason"),
        (dup_of if dup_of is not None else F.lit(None)).cast("long").alias("dup_of"),
    )


def broadcast_if_small(df: DataFrame) -> DataFrame:
    """``df`` cached, and marked for broadcast when it holds at most ``BROADCAST_ROWS`` rows.

    The dedup stages join a few shared keys (those held by more than one document or unit) back onto
    every row: broadcast, the big side stays where it is, with no shuffle or sort of its texts. Spark
    cannot know the shared keys are few before it has computed them (its adaptive execution switches to
    a broadcast only after both sides were shuffled), so they are counted first, which also fills the cache."""
    df = df.cache()
    return F.broadcast(df) if df.count() <= BROADCAST_ROWS else df

