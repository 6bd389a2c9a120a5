"""Stage 2: C4 line rules (text edited) then Gopher quality/repetition rules (documents removed).

When the quality stage runs next (the report's order), this stage's pass over the texts also scores
their judged sentences for it (:func:`haina.data_spark.stages.quality.score_texts`)."""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.config import HeuristicsConfig
from haina.data_spark.rules import clean_lines, document_reasons
from haina.data_spark.stages import quality
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import approx_tokens

FIELDS = [
    T.StructField("text", T.StringType()),
    T.StructField("ntok", T.LongType()),
    T.StructField("lines_removed", T.IntegerType()),
    T.StructField("_reason", T.StringType()),
]


def _apply(cfg: HeuristicsConfig, score=None):
    def apply(batch: pa.RecordBatch) -> dict[str, list]:
        out: dict[str, list] = {"text": [], "ntok": [], "lines_removed": [], "_reason": []}
        kinds = texts(batch, "kind")
        for text, kind, ntok in zip(texts(batch), kinds, texts(batch, "ntok"), strict=True):
            cleaned, dropped = clean_lines(text, kind, cfg)
            empty = not cleaned.strip()
            cleaned = text if empty else cleaned
            out["text"].append(cleaned)
            out["ntok"].append(approx_tokens(cleaned) if dropped else ntok)
            out["lines_removed"].append(dropped)
            out["_reason"].append("c4: every line is boilerplate" if empty else None)
        judged = [i for i, reason in enumerate(out["_reason"]) if reason is None]
        found = document_reasons([out["text"][i] for i in judged], [kinds[i] for i in judged], cfg)
        for i, reason in zip(judged, found, strict=True):
            out["_reason"][i] = reason
        if score is not None:  # the quality stage's first pass, on the documents kept
            judged_kinds = [kind if reason is None else None for kind, reason in zip(kinds, out["_reason"], strict=True)]
            out |= score(out["text"], judged_kinds)
        return out

    return apply


def _quality_pass(ctx: StageContext):
    """The quality stage's first pass (every judged sentence scored), for this stage's batches."""
    qcfg = ctx.cfg.quality
    bc = ctx.spark.sparkContext.broadcast(quality.model_of(qcfg))

    def score(batch_texts: list[str], kinds: list[str | None]) -> dict[str, list]:
        return quality.score_texts(bc.value, batch_texts, kinds, qcfg)

    return score


def run(df, ctx: StageContext) -> StageResult:
    # When the quality stage comes next, its first pass runs in this one, on the texts as this stage leaves
    # them (the texts cross to Python once for both); the scores travel to it as columns (quality.SCORED),
    # which it drops.
    score = _quality_pass(ctx) if ctx.following == "quality" else None
    fields = FIELDS + (quality.SCORED if score is not None else [])
    judged = map_columns(df, _apply(ctx.cfg.heuristics, score), fields).cache()
    kept = judged.filter(F.col("_reason").isNull()).drop("_reason")
    removed = removed_rows(judged.filter(F.col("_reason").isNotNull()), F.col("_reason"))
    return StageResult(kept, removed)
