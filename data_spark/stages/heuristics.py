"""Stage 2: C4 line rules (text edited) then Gopher quality/repetition rules (documents removed)."""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.config import HeuristicsConfig
from haina.data_spark.rules import clean_lines, document_reason
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import approx_tokens

FIELDS = [
    T.StructField("text", T.StringType()),
    T.StructField("ntok", T.LongType()),
    T.StructField("lines_removed", T.IntegerType()),
    T.StructField("_reason", T.StringType()),
]


def _apply(cfg: HeuristicsConfig):
    def apply(batch: pa.RecordBatch) -> dict[str, list]:
        out: dict[str, list] = {"text": [], "ntok": [], "lines_removed": [], "_reason": []}
        for text, kind, ntok in zip(texts(batch), texts(batch, "kind"), texts(batch, "ntok"), strict=True):
            cleaned, dropped = clean_lines(text, kind, cfg)
            if not cleaned.strip():
                reason = "c4: every line is boilerplate"
                cleaned = text
            else:
                reason = document_reason(cleaned, kind, cfg)
            out["text"].append(cleaned)
            out["ntok"].append(approx_tokens(cleaned) if dropped else ntok)
            out["lines_removed"].append(dropped)
            out["_reason"].append(reason)
        return out

    return apply


def run(df, ctx: StageContext) -> StageResult:
    judged = map_columns(df, _apply(ctx.cfg.heuristics), FIELDS).cache()
    kept = judged.filter(F.col("_reason").isNull()).drop("_reason")
    removed = removed_rows(judged.filter(F.col("_reason").isNotNull()), F.col("_reason"))
    return StageResult(kept, removed)
