"""Stage 3: sentence-level quality classifier; low-quality sentences go, the document keeps its score.

The score of a document is the character-weighted mean probability of its judged sentences, taken
before removal so it says how clean the original was. Kinds not listed in ``quality.kinds`` (code by
default: the classifier reads prose) and documents without a judged sentence score 1.0.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.config import QualityConfig
from haina.data_spark.linear_model import LinearModel, fit_and_save, read_seed
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import approx_tokens, is_cjk, sentences

FIELDS = [
    T.StructField("text", T.StringType()),
    T.StructField("ntok", T.LongType()),
    T.StructField("quality_score", T.DoubleType()),
    T.StructField("sentences_removed", T.IntegerType()),
    T.StructField("_reason", T.StringType()),
]


def judge(text: str, model: LinearModel, cfg: QualityConfig) -> tuple[str, float, int]:
    """(text without low-quality sentences, document score, sentences removed)."""
    lines_out, removed, weighted, chars = [], 0, 0.0, 0
    for line in text.split("\n"):
        pieces = sentences(line)
        keep, changed = [], False
        for piece in pieces:
            if len(piece.strip()) < cfg.min_sentence_chars:
                keep.append(piece)
                continue
            prob = model.score(piece)
            weighted += prob * len(piece)
            chars += len(piece)
            if prob < cfg.sentence_threshold:
                removed += 1
                changed = True
            else:
                keep.append(piece)
        if not changed:
            lines_out.append(line)
        elif keep:
            joiner = "" if all(is_cjk(p.strip()[-1]) or p.strip()[-1] in "。！？" for p in keep[:-1]) else " "
            lines_out.append(joiner.join(p.strip() for p in keep))
    score = weighted / chars if chars else 1.0
    return "\n".join(lines_out).strip("\n"), score, removed


def _apply(bc, cfg: QualityConfig):
    kinds = set(cfg.kinds)

    def apply(batch: pa.RecordBatch) -> dict[str, list]:
        model = bc.value
        out: dict[str, list] = {f.name: [] for f in FIELDS}
        for text, kind, ntok in zip(texts(batch), texts(batch, "kind"), texts(batch, "ntok"), strict=True):
            if kind not in kinds:
                new_text, score, removed = text, 1.0, 0
            else:
                new_text, score, removed = judge(text, model, cfg)
            reason = None
            if not new_text.strip():
                reason, new_text = "quality: every sentence below threshold", text
            elif score < cfg.min_doc_score:
                reason = f"quality: score {score:.2f} < {cfg.min_doc_score}"
            out["text"].append(new_text)
            out["ntok"].append(approx_tokens(new_text) if removed else ntok)
            out["quality_score"].append(round(score, 6))
            out["sentences_removed"].append(removed)
            out["_reason"].append(reason)
        return out

    return apply


def fit(ctx: StageContext, cfg: QualityConfig) -> LinearModel:
    rows = read_seed("quality_seed.tsv", cfg.model.seed_file)
    return fit_and_save(ctx.spark, rows, cfg.model, ctx.workdir / "models" / "quality.npz", ctx.notes, "quality_model")


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.quality
    model = fit(ctx, cfg)
    bc = ctx.spark.sparkContext.broadcast(model)
    judged = map_columns(df, _apply(bc, cfg), FIELDS).cache()
    kept = judged.filter(F.col("_reason").isNull()).drop("_reason")
    removed = removed_rows(judged.filter(F.col("_reason").isNotNull()), F.col("_reason"))
    return StageResult(kept, removed, {"model": ctx.notes["quality_model"]})
