"""Stage 1: exact dedup on normalized text; the first occurrence (smallest row id) is kept."""

from __future__ import annotations

import hashlib

import pyarrow as pa
from pyspark.sql import Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import normalize


def _keys(batch: pa.RecordBatch) -> dict[str, list]:
    return {"_key": [hashlib.blake2b(normalize(t).encode("utf-8"), digest_size=16).digest() for t in texts(batch)]}


def run(df, ctx: StageContext) -> StageResult:
    keyed = map_columns(df, _keys, [T.StructField("_key", T.BinaryType())])
    first = keyed.withColumn("_first", F.min("row_id").over(Window.partitionBy("_key")))
    kept = first.filter(F.col("row_id") == F.col("_first")).drop("_key", "_first")
    dups = first.filter(F.col("row_id") != F.col("_first"))
    removed = removed_rows(dups, F.lit("exact duplicate"), F.col("_first"))
    return StageResult(kept, removed)
