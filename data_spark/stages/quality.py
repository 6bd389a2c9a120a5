"""Stage 3: sentence-level quality classifier; low-quality sentences go, the document keeps its score.

Two passes over the documents. The first scores every judged sentence (:func:`judged_sentences`: the
sentences of each line, short ones left out) and keeps the log-odds beside the text; when the heuristics
stage runs right before this one, that stage's pass over the texts does this (:func:`score_texts`), and
the scores arrive as columns. The cut is then
either ``quality.sentence_threshold`` or, by default, the point below which ``target_removal_share`` of
the judged sentences' characters lies, read off a histogram of log-odds (each Arrow batch of the scores
binned in numpy, the bins summed by Spark: a few thousand come to the driver, never a sentence; exploding a
row per sentence for Spark to group took several times as long). The second pass removes the sentences
below the cut and says what it took out of each document, which the report sums.
A classifier's probabilities on one corpus say little about another (the seed's prose is not the job's),
so a share the report can be compared with is the default, not a probability.

The score of a document is the character-weighted mean probability of its judged sentences, taken
before removal so it says how clean the original was. Kinds not listed in ``quality.kinds`` (code by
default: the classifier reads prose) and documents without a judged sentence score 1.0.

The stage's notes in ``report.json`` give the model's seed, the cut and how it was chosen, what it
removed, and a sample of removed sentences with their scores (the lowest and those just below the cut),
so a person can judge where the cut fell.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, packed, summarize_batches, texts, unpacked_column
from haina.data_spark.config import QualityConfig
from haina.data_spark.linear_model import LinearModel, fit_and_save, logit_of, read_seed, sigmoid, train
from haina.data_spark.quality_seed import build_seed
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import is_cjk, judged_sentences, sentences_by_line

# The first pass's numbers per judged sentence, packed per document (arrow_batches.packed): log-odds, characters,
# approximate tokens.
SCORED = [T.StructField(name, T.BinaryType()) for name in ("_qlogit", "_qlen", "_qtok")]
SCORED_TYPES = {"_qlogit": "<f8", "_qlen": "<i4", "_qtok": "<i4"}
FIELDS = [
    T.StructField("text", T.StringType()),
    T.StructField("ntok", T.LongType()),
    T.StructField("quality_score", T.DoubleType()),
    T.StructField("sentences_removed", T.IntegerType()),
    T.StructField("_reason", T.StringType()),
]
REMOVED = [  # what the second pass took out of each document, summed for the report, then dropped
    T.StructField("_qrm_chars", T.LongType()),
    T.StructField("_qrm_tokens", T.LongType()),
]
HISTOGRAM = [T.StructField(name, T.LongType()) for name in ("bin", "sentences", "chars", "tokens")]
SAMPLE = [T.StructField("logit", T.DoubleType()), T.StructField("row_id", T.LongType()),
          T.StructField("pos", T.IntegerType())]
BINS_PER_UNIT = 100  # histogram resolution in log-odds: 0.01, a change of at most 0.25% in probability
LOGIT_RANGE = 30.0  # log-odds beyond +-30 share the end bins


def judge(text: str, logits: list[float], cut: float, cfg: QualityConfig) -> tuple[str, float, int]:
    """(text without the sentences whose log-odds are below ``cut``, document score, sentences removed);
    ``logits`` are those of ``judged_sentences(text)``, in order. A line that loses no sentence is kept as it
    was; one that does keeps its other sentences, stripped and joined."""
    scores = iter(logits)
    lines_out, removed, weighted, chars = [], 0, 0.0, 0
    for line, pieces in zip(text.split("\n"), sentences_by_line(text), strict=True):
        keep, changed = [], False
        for piece in pieces:
            if len(piece.strip()) < cfg.min_sentence_chars:
                keep.append(piece)
                continue
            logit = next(scores)
            weighted += sigmoid(logit) * len(piece)
            chars += len(piece)
            if logit < cut:
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


def score_texts(model: LinearModel, batch_texts: list[str], kinds: list[str | None], cfg: QualityConfig
                ) -> dict[str, pa.Array]:
    """The first pass's columns (``SCORED``) of some texts: the log-odds, characters and approximate tokens of
    each judged sentence, every judged sentence of the batch in one sparse product; a text of a kind not
    judged (or None) gets none."""
    judged = set(cfg.kinds)
    pieces: list[str] = []
    counts = np.zeros(len(batch_texts), dtype=np.int64)
    for i, (text, kind) in enumerate(zip(batch_texts, kinds, strict=True)):
        found = judged_sentences(text, cfg.min_sentence_chars) if kind in judged else []
        pieces += found
        counts[i] = len(found)
    logits, ntok = model.logits_and_tokens(pieces)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    values = {"_qlogit": logits, "_qlen": lengths, "_qtok": ntok}
    return {name: packed(values[name].astype(SCORED_TYPES[name]), counts) for name in SCORED_TYPES}


def scored_lists(batch: pa.RecordBatch, name: str) -> list[list]:
    """A ``SCORED`` column of a batch as a list of each document's values."""
    values, counts = unpacked_column(batch.column(name), SCORED_TYPES[name])
    flat, ends = values.tolist(), np.cumsum(counts).tolist()
    return [flat[end - n : end] for end, n in zip(ends, counts.tolist(), strict=True)]


def _score(bc, cfg: QualityConfig):
    def score(batch: pa.RecordBatch) -> dict[str, list]:
        return score_texts(bc.value, texts(batch), texts(batch, "kind"), cfg)

    return score


def _unchanged_score(logits: list[float], lengths: list[int]) -> float:
    """:func:`judge`'s document score when no sentence goes, from the first pass's columns alone: the text
    need not be split again."""
    chars = sum(lengths)
    return sum(sigmoid(x) * n for x, n in zip(logits, lengths, strict=True)) / chars if chars else 1.0


def _apply(cut: float, cfg: QualityConfig):
    def apply(batch: pa.RecordBatch) -> dict[str, list]:
        out: dict[str, list] = {f.name: [] for f in FIELDS + REMOVED}
        columns = (texts(batch), scored_lists(batch, "_qlogit"), scored_lists(batch, "_qlen"),
                   scored_lists(batch, "_qtok"), texts(batch, "ntok"), texts(batch, "kind"))
        for text, logits, lengths, tokens, ntok, kind in zip(*columns, strict=True):
            gone_chars = gone_tokens = 0
            if kind not in cfg.kinds:
                new_text, score, removed = text, 1.0, 0
            elif not logits or min(logits) >= cut:  # nothing below the cut: no second split of the text
                new_text, score, removed = text, _unchanged_score(logits, lengths), 0
            else:
                new_text, score, removed = judge(text, logits, cut, cfg)
                gone = [i for i, logit in enumerate(logits) if logit < cut]
                gone_chars, gone_tokens = sum(lengths[i] for i in gone), sum(tokens[i] for i in gone)
            # a removed sentence takes its own tokens: a piece ends at a full stop, a symbol, so no token spans
            # two pieces, and the kept ones are joined by a space or nothing
            left, reason = ntok - gone_tokens, None
            if not new_text.strip():
                reason, new_text, left = "quality: every sentence below threshold", text, ntok
            elif score < cfg.min_doc_score:
                reason = f"quality: score {score:.2f} < {cfg.min_doc_score}"
            out["text"].append(new_text)
            out["ntok"].append(left)
            out["quality_score"].append(round(score, 6))
            out["sentences_removed"].append(removed)
            out["_reason"].append(reason)
            out["_qrm_chars"].append(gone_chars)
            out["_qrm_tokens"].append(gone_tokens)
        return out

    return apply


def _flat(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(every value, each row's count) of a ``SCORED`` column."""
    return unpacked_column(batch.column(name), SCORED_TYPES[name])


def _bin_of(logits: np.ndarray) -> np.ndarray:
    """The histogram bin of each log-odds (those beyond +-``LOGIT_RANGE`` in the end bins)."""
    return np.floor(np.clip(logits, -LOGIT_RANGE, LOGIT_RANGE - 1e-9) * BINS_PER_UNIT).astype(np.int64)


def _batch_histogram(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """One batch's judged sentences, characters and tokens per bin of log-odds."""
    logits, _ = _flat(batch, "_qlogit")
    bins, which = np.unique(_bin_of(logits), return_inverse=True)
    out = {"bin": bins, "sentences": np.bincount(which, minlength=len(bins))}
    for name, column in (("chars", "_qlen"), ("tokens", "_qtok")):
        sums = np.zeros(len(bins), dtype=np.int64)
        np.add.at(sums, which, _flat(batch, column)[0].astype(np.int64))
        out[name] = sums
    return out


class Histogram(NamedTuple):
    """Judged sentences per bin of log-odds (non-empty bins, ascending): the bins' lower edges, and the
    sentences, characters and approximate tokens in each."""

    edges: np.ndarray
    sentences: np.ndarray
    chars: np.ndarray
    tokens: np.ndarray


def histogram(scored: DataFrame) -> Histogram:
    """The :class:`Histogram` of every judged sentence: each Arrow batch of the first pass's columns binned in
    numpy, the batches' bins summed by Spark (a few thousand rows reach the driver, never a sentence)."""
    per_batch = summarize_batches(scored.select("_qlogit", "_qlen", "_qtok"), _batch_histogram, HISTOGRAM)
    rows = per_batch.groupBy("bin").agg(*(F.sum(c).alias(c) for c in ("sentences", "chars", "tokens"))).collect()
    rows.sort(key=lambda r: r["bin"])
    column = {c: np.array([r[c] for r in rows], dtype=np.int64) for c in ("bin", "sentences", "chars", "tokens")}
    return Histogram(column["bin"] / BINS_PER_UNIT, column["sentences"], column["chars"], column["tokens"])


def cut_for_share(edges: np.ndarray, weights: np.ndarray, share: float) -> float:
    """The smallest bin edge below which at least ``share`` of the weight lies (the share quantile):
    -inf (nothing removed) for a share of 0 or nothing to judge, +inf when every bin is needed. Sentences
    of one score (repeats of a line) fall in one bin and go together, so a small corpus with repeated
    lines can lose more than ``share``; a large one lands within a bin's width of it."""
    total = weights.sum()
    if total <= 0 or share <= 0:
        return float("-inf")
    reached = np.cumsum(weights) / total >= share - 1e-12  # cutting above bin i removes bins 0..i
    first = int(np.argmax(reached)) if reached.any() else len(edges) - 1
    return float(edges[first + 1]) if first + 1 < len(edges) else float("inf")


def choose_cut(hist: Histogram, cfg: QualityConfig) -> tuple[float, dict[str, object]]:
    """The log-odds cut and how it was chosen (notes)."""
    if cfg.sentence_threshold is not None:
        return logit_of(cfg.sentence_threshold), {"rule": "sentence_threshold"}
    share = float(cfg.target_removal_share or 0.0)
    cut = cut_for_share(hist.edges, hist.chars.astype(float), share) if len(hist.edges) else float("-inf")
    return cut, {"rule": "target_removal_share", "target_removal_share": share,
                 "histogram_bin": 1.0 / BINS_PER_UNIT}


def _threshold(cut: float) -> float:
    return 0.0 if cut == float("-inf") else 1.0 if cut == float("inf") else round(sigmoid(cut), 6)


def removal_summary(hist: Histogram, judged: DataFrame) -> dict[str, object]:
    """Judged and removed sentences, characters and (approximate) tokens, and the removed shares of each: the
    judged ones from the histogram, the removed ones from what the second pass took out of each document."""
    row = judged.agg(*(F.coalesce(F.sum(c), F.lit(0)).alias(c)
                       for c in ("sentences_removed", "_qrm_chars", "_qrm_tokens"))).first()
    removed = {"sentences": row["sentences_removed"], "chars": row["_qrm_chars"], "tokens": row["_qrm_tokens"]}
    out: dict[str, object] = {}
    for unit, name in (("sentences", "sentence"), ("chars", "char"), ("tokens", "token")):
        total, gone = int(getattr(hist, unit).sum()), int(removed[unit])
        out |= {f"judged_{unit}": total, f"removed_{unit}": gone,
                f"removed_{name}_share": round(gone / total, 6) if total else 0.0}
    return out


def _lowest_and_highest(logits: np.ndarray, rows: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest and the ``k`` highest log-odds, ties by (row id, position)."""
    return np.union1d(np.lexsort((pos, rows, logits))[:k], np.lexsort((pos, rows, -logits))[:k])


def removed_sample(scored: DataFrame, cut: float, cfg: QualityConfig) -> dict[str, list]:
    """The ``report_removed`` lowest-scoring removed sentences and the ``report_removed`` highest-scoring
    ones (just below the cut), with scores, document ids and texts; ordered by (score, row id, position)
    so the sample is the same on every run. Each Arrow batch offers its own lowest and highest removed
    sentences; only those and the sampled documents' texts reach the driver."""
    k = cfg.report_removed
    if k == 0 or cut == float("-inf"):
        return {"lowest": [], "just_below_cut": []}

    def candidates(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
        logits, counts = _flat(batch, "_qlogit")
        rows = np.repeat(batch.column("row_id").to_numpy(zero_copy_only=False), counts)
        pos = np.arange(len(logits)) - np.repeat(np.cumsum(counts) - counts, counts)
        below = np.flatnonzero(logits < cut)
        chosen = below[_lowest_and_highest(logits[below], rows[below], pos[below], k)]
        return {"logit": logits[chosen], "row_id": rows[chosen], "pos": pos[chosen]}

    found = summarize_batches(scored.select("row_id", "_qlogit"), candidates, SAMPLE).collect()
    lowest = sorted(found, key=lambda r: (r["logit"], r["row_id"], r["pos"]))[:k]
    near = sorted(found, key=lambda r: (-r["logit"], r["row_id"], r["pos"]))[:k]
    wanted = sorted({r["row_id"] for r in (*lowest, *near)})
    docs = {r["row_id"]: (r["doc_id"], r["text"]) for r in
            scored.filter(F.col("row_id").isin(wanted)).select("row_id", "doc_id", "text").collect()}

    def entry(r) -> dict[str, object]:
        doc_id, text = docs[r["row_id"]]
        return {"score": round(sigmoid(r["logit"]), 6), "doc_id": doc_id, "row_id": r["row_id"],
                "text": judged_sentences(text, cfg.min_sentence_chars)[r["pos"]].strip()}

    return {"lowest": [entry(r) for r in lowest], "just_below_cut": [entry(r) for r in near]}


def _seed(cfg: QualityConfig) -> tuple[list[tuple[float, str]], dict | None]:
    if cfg.model.seed_file is None:
        seed = build_seed()
        return seed.rows, seed.sizes
    return read_seed("quality_seed.tsv", cfg.model.seed_file), None


def model_of(cfg: QualityConfig) -> LinearModel:
    """:func:`fit`'s classifier, without saving it or noting its metrics (fitted once per process)."""
    return train(_seed(cfg)[0], cfg.model, shape=True, balanced=True)


def fit(ctx: StageContext, cfg: QualityConfig) -> LinearModel:
    """The classifier: on the built seed (installed text, generated bad lines, the packaged seed file) or
    on ``quality.model.seed_file`` alone."""
    rows, sizes = _seed(cfg)
    path = ctx.workdir / "models" / "quality.npz"
    model = fit_and_save(rows, cfg.model, path, ctx.notes, "quality_model", shape=True, balanced=True)
    if sizes is not None:
        ctx.notes["quality_model"] = {**ctx.notes["quality_model"], "seed_sources": sizes}
    return model


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.quality
    model = fit(ctx, cfg)
    if {f.name for f in SCORED} <= set(df.columns):  # scored by the heuristics stage's pass (heuristics.run)
        scored = df
    else:
        bc = ctx.spark.sparkContext.broadcast(model)
        scored = map_columns(df, _score(bc, cfg), SCORED).cache()
    hist = histogram(scored)
    cut, how = choose_cut(hist, cfg)
    judged = map_columns(scored, _apply(cut, cfg), FIELDS + REMOVED, drop=("_qlogit", "_qlen", "_qtok")).cache()
    cut_notes = {**how, "threshold": _threshold(cut), "threshold_logit": round(cut, 6) if math.isfinite(cut) else None,
                 **removal_summary(hist, judged)}
    sample = removed_sample(scored, cut, cfg)
    kept = judged.filter(F.col("_reason").isNull()).drop("_reason", *(f.name for f in REMOVED))
    removed = removed_rows(judged.filter(F.col("_reason").isNotNull()), F.col("_reason"))
    return StageResult(kept, removed, {"model": ctx.notes["quality_model"], "cut": cut_notes,
                                       "removed_sample": sample})
