"""Stage 1: exact dedup on normalized text; the first occurrence (smallest row id) is kept.

The key is the one ingest took from the text as it came in (``_key``, :mod:`haina.data_spark.ingest_keys`),
wherever the stage order puts this stage; run on its own, the stage keys the text it receives.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import functions as F

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.ingest_keys import KEY_FIELD, exact_key
from haina.data_spark.stages.base import StageContext, StageResult, broadcast_if_small, removed_rows
from haina.data_spark.text import normalize_many


def _keys(batch: pa.RecordBatch) -> dict[str, list]:
    return {"_key": [exact_key(text) for text in normalize_many(texts(batch))]}


def run(df, ctx: StageContext) -> StageResult:
    # The keys alone are grouped (a hash aggregate of 24 bytes a row); the few held by more than one
    # document, with their smallest row id, are joined back (broadcast_if_small): the texts are neither
    # shuffled nor sorted, as a window over the keys did to every row.
    keyed = df if "_key" in df.columns else map_columns(df, _keys, [KEY_FIELD]).cache()
    shared = (keyed.groupBy("_key").agg(F.min("row_id").alias("_first"), F.count("*").alias("_n"))
              .filter(F.col("_n") > 1).drop("_n"))
    marked = keyed.join(broadcast_if_small(shared), "_key", "left")
    kept = marked.filter(F.col("_first").isNull() | (F.col("row_id") == F.col("_first"))).drop("_key", "_first")
    dups = marked.filter(F.col("row_id") != F.col("_first"))
    removed = removed_rows(dups, F.lit("exact duplicate"), F.col("_first"))
    return StageResult(kept, removed)
