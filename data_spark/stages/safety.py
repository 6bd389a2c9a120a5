"""Stage 7: content safety from a phrase list and a line classifier trained on the packaged seed set.

A line is unsafe when it contains a listed phrase or the model's probability reaches the threshold.
``drop_document`` removes the whole document (the default: the rest of a text that carries a threat is
rarely worth keeping); ``drop_lines`` removes only the unsafe lines. The maximum line probability is
kept as ``safety_score`` either way.

With ``drop_document``, when the embedding stage runs right before this one, that stage's pass over the
texts judges them for this one (:func:`carried_verdicts`) and the verdicts arrive as columns
(``CARRIED``): the texts cross to Python once for both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.config import SafetyConfig
from haina.data_spark.linear_model import LinearModel, fit_and_save, read_seed, train
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import approx_tokens

FIELDS = [
    T.StructField("text", T.StringType()),
    T.StructField("ntok", T.LongType()),
    T.StructField("safety_score", T.DoubleType()),
    T.StructField("_reason", T.StringType()),
]
CARRIED = [T.StructField("_safety_score", T.DoubleType()), T.StructField("_safety_reason", T.StringType())]


def judge(text: str, model: LinearModel, cfg: SafetyConfig, probs: list[float] | None = None) -> tuple[str, float, str | None]:
    """(text without unsafe lines, max line probability, reason of the first unsafe line or None).
    ``probs``: the model's probability of each line that :func:`scored_lines` lists, in order (computed
    for a whole batch at once); None scores them here."""
    phrases = [p.lower() for p in cfg.blocklist]
    if probs is None:
        probs = [float(v) for v in _probabilities(model, scored_lines(text, cfg))]
    scores = iter(probs)
    kept, worst, reason = [], 0.0, None
    for line in text.split("\n"):
        hit = None
        if phrases:
            lowered = line.lower()
            hit = next((p for p in phrases if p in lowered), None)
        prob = 1.0 if hit else next(scores) if len(line.strip()) >= cfg.min_line_chars else 0.0
        worst = max(worst, prob)
        if prob >= cfg.threshold:
            reason = reason or (f"safety: blocklist {hit!r}" if hit else f"safety: model {prob:.2f}")
            continue
        kept.append(line)
    return "\n".join(kept), worst, reason


def scored_lines(text: str, cfg: SafetyConfig) -> list[str]:
    """The lines of ``text`` the model scores: long enough, and no listed phrase in them."""
    phrases = [p.lower() for p in cfg.blocklist]
    lines = [line for line in text.split("\n") if len(line.strip()) >= cfg.min_line_chars]
    return [line for line in lines if not any(p in line.lower() for p in phrases)] if phrases else lines


def _probabilities(model: LinearModel, lines: list[str]) -> np.ndarray:
    """:meth:`LinearModel.score` of every line, in one sparse product."""
    logits = model.logits(lines)
    odds = np.exp(-np.abs(logits))  # sigmoid's two branches, as linear_model.sigmoid takes them
    return np.where(logits >= 0, 1.0 / (1.0 + odds), odds / (1.0 + odds))


def _seed(cfg: SafetyConfig) -> list[tuple[float, str]]:
    rows = read_seed("safety_seed.tsv", cfg.model.seed_file)
    if cfg.model.seed_file is None:  # clean prose and spam are both "safe" examples
        rows += [(0.0, text) for _, text in read_seed("quality_seed.tsv")]
    return rows


def model_of(cfg: SafetyConfig) -> LinearModel:
    """:func:`fit`'s classifier, without saving it or noting its metrics (fitted once per process)."""
    return train(_seed(cfg), cfg.model)


def fit(ctx: StageContext, cfg: SafetyConfig) -> LinearModel:
    return fit_and_save(_seed(cfg), cfg.model, ctx.workdir / "models" / "safety.npz", ctx.notes, "safety_model")


def verdicts(model: LinearModel, cfg: SafetyConfig, docs: list[str], ntoks: list[int]) -> dict[str, list]:
    """``FIELDS`` of some documents: every scored line of them in one sparse product, then :func:`judge`."""
    out: dict[str, list] = {f.name: [] for f in FIELDS}
    lines = [scored_lines(text, cfg) for text in docs]
    flat = _probabilities(model, [line for group in lines for line in group]).tolist()
    start = 0
    for text, ntok, group in zip(docs, ntoks, lines, strict=True):
        new_text, score, reason = judge(text, model, cfg, flat[start : start + len(group)])
        start += len(group)
        if reason and cfg.action == "drop_lines" and new_text.strip():
            text, ntok, reason = new_text, approx_tokens(new_text), None
        out["text"].append(text)
        out["ntok"].append(ntok)
        out["safety_score"].append(round(score, 6))
        out["_reason"].append(reason)
    return out


def carried_verdicts(ctx: StageContext) -> Callable[[list[str], list[int]], dict[str, list]] | None:
    """For the stage before this one (embedding), when it sends the texts to Python anyway and this stage
    would leave them as they are (``drop_document``): ``fn(texts, ntoks) -> {column: values}`` of
    ``CARRIED``, which :func:`run` then reads instead of sending the texts through Python once more.
    None when this stage does not run next or may edit the texts."""
    cfg = ctx.cfg.safety
    if ctx.following != "safety" or cfg.action != "drop_document":
        return None
    bc = ctx.spark.sparkContext.broadcast(fit(ctx, cfg))

    def carried(docs: list[str], ntoks: list[int]) -> dict[str, list]:
        out = verdicts(bc.value, cfg, docs, ntoks)
        return {"_safety_score": out["safety_score"], "_safety_reason": out["_reason"]}

    return carried


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.safety
    model = fit(ctx, cfg)
    if {f.name for f in CARRIED} <= set(df.columns):  # judged in the stage before (carried_verdicts)
        judged = df.select(*(c for c in df.columns if c not in {"text", "ntok", *(f.name for f in CARRIED)}),
                           "text", "ntok", F.col("_safety_score").alias("safety_score"),
                           F.col("_safety_reason").alias("_reason"))
    else:
        bc = ctx.spark.sparkContext.broadcast(model)

        def apply(batch: pa.RecordBatch) -> dict[str, list]:
            return verdicts(bc.value, cfg, texts(batch), texts(batch, "ntok"))

        judged = map_columns(df, apply, FIELDS).cache()
    kept = judged.filter(F.col("_reason").isNull()).drop("_reason")
    removed = removed_rows(judged.filter(F.col("_reason").isNotNull()), F.col("_reason"))
    return StageResult(kept, removed, {"model": ctx.notes["safety_model"]})
