"""Stage 1: exact dedup on normalized text; the first occurrence (smallest row id) is kept.

The key is the one ingest took from the text as it came in (``_key``, :mod:`haina.data_spark.ingest_keys`),
wherever the stage order puts this stage; run on its own, the stage keys the text it receives.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import Window
from pyspark.sql import functions as F

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.ingest_keys import KEY_FIELD, exact_key
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import normalize


def _keys(batch: pa.RecordBatch) -> dict[str, list]:
    return {"_key": [exact_key(normalize(t)) for t in texts(batch)]}


def run(df, ctx: StageContext) -> StageResult:
    keyed = df if "_key" in df.columns else map_columns(df, _keys, [KEY_FIELD])
    # cached: kept and removed are both cut from the one window (one shuffle of the texts, not two)
    first = keyed.withColumn("_first", F.min("row_id").over(Window.partitionBy("_key"))).cache()
    kept = first.filter(F.col("row_id") == F.col("_first")).drop("_key", "_first")
    dups = first.filter(F.col("row_id") != F.col("_first"))
    removed = removed_rows(dups, F.lit("exact duplicate"), F.col("_first"))
    return StageResult(kept, removed)
