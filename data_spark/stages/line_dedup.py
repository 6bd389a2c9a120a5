"""Stage 4: paragraph- and line-level exact dedup across the corpus; the first occurrence is kept.

Units are hashed per batch; finding each unit's first occurrence (smallest row id, then position)
is a native window and group-by, so Python never runs in the shuffle. Units shorter than
``min_chars`` are never removed: closing braces and short headings repeat legitimately.

The default units, paragraphs then lines, take one pass, not two: the paragraphs and the lines are both
keyed on the text as it comes (:func:`drop_both` says why that finds what a line pass after the
paragraph pass finds), so the texts go through Python twice (keys, then the edit) instead of four times.
Only the row ids and texts go to the keying, and only the keys come back.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import approx_tokens, normalize, normalize_lines

_PARAGRAPH_BREAK = re.compile(r"(\n(?:[ \t]*\n)+)")
EMPTY_FIELD = T.StructField("_empty", T.BooleanType())  # nothing but spaces is left of the text


def _blank(text: str) -> bool:
    """Whether the text holds nothing but spaces, as Spark's ``trim`` sees it: told by the pass that edits
    the texts, so the JVM need not count every text's characters to find the few emptied ones."""
    return not text.strip(" ")


UNIT_TYPE = T.ArrayType(T.StructType([T.StructField("pos", T.IntegerType()), T.StructField("key", T.LongType())]))


def _digest(norm: str) -> bytes:
    """Eight bytes of BLAKE2b of a unit's normal form: a long, which the windows over 1.3 million units sort
    and shuffle in about a fifth less time than 16 bytes. Two of a billion distinct units share one with a
    chance of about 3%, and the cost of that is one line removed."""
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest()


def unit_key(norm: str) -> int:
    """The key of a unit from its normal form (:func:`_digest` as a signed little-endian long)."""
    return int.from_bytes(_digest(norm), "little", signed=True)


def split_units(text: str, unit: str) -> tuple[list[str], list[str]]:
    """(units, separators): ``units[i] + separators[i] + ...`` rebuilds the text exactly."""
    if unit == "line":
        pieces = text.split("\n")
        return pieces, ["\n"] * (len(pieces) - 1) + [""]
    parts = _PARAGRAPH_BREAK.split(text)
    return parts[0::2], [*parts[1::2], ""]


def unit_keys(text: str, unit: str, min_chars: int) -> list[dict]:
    units, _ = split_units(text, unit)
    out = []
    for pos, piece in enumerate(units):
        norm = normalize(piece)
        if len(norm) >= min_chars:
            out.append({"pos": pos, "key": unit_key(norm)})
    return out


def rebuild(text: str, unit: str, drop: set[int]) -> str:
    units, seps = split_units(text, unit)
    kept = [(u, s) for i, (u, s) in enumerate(zip(units, seps, strict=True)) if i not in drop]
    return "".join(u + s for u, s in kept).strip("\n")


def unit_tokens(text: str, unit: str, positions: set[int]) -> int:
    """The approximate tokens of the units of ``text`` at ``positions``: what removing them takes from the
    text's count (no token or symbol spans a line break, and the separators are blank)."""
    return sum(approx_tokens(piece) for i, piece in enumerate(split_units(text, unit)[0]) if i in positions)


def _pass(df: DataFrame, unit: str, min_chars: int) -> DataFrame:
    def keys(batch: pa.RecordBatch) -> dict[str, list]:
        return {"_units": [unit_keys(t, unit, min_chars) for t in texts(batch)]}

    keyed = map_columns(df.select("row_id", "text"), keys, [T.StructField("_units", UNIT_TYPE)], drop=("text",))
    units = keyed.select("row_id", F.explode("_units").alias("u")).select("row_id", "u.pos", "u.key")
    # Each unit's first occurrence over a window on its key: one shuffle of the units, no join back.
    first = F.min(F.struct("row_id", "pos")).over(Window.partitionBy("key"))
    repeats = (
        units.withColumn("first", first)
        .filter((F.col("first.row_id") != F.col("row_id")) | (F.col("first.pos") != F.col("pos")))
        .groupBy("row_id")
        .agg(F.array_sort(F.collect_list("pos")).alias("_drop"))
    )
    joined = df.join(repeats, "row_id", "left")
    counter = f"{unit}s_removed"

    def apply(batch: pa.RecordBatch) -> dict[str, list]:
        out: dict[str, list] = {"text": [], "ntok": [], counter: [], "_empty": []}
        for text, ntok, drop in zip(texts(batch), texts(batch, "ntok"), texts(batch, "_drop"), strict=True):
            if drop:
                ntok -= unit_tokens(text, unit, set(drop))
                text = rebuild(text, unit, set(drop))
            out["text"].append(text)
            out["ntok"].append(ntok)
            out[counter].append(len(drop or ()))
            out["_empty"].append(_blank(text))
        return out

    fields = [T.StructField("text", T.StringType()), T.StructField("ntok", T.LongType()),
              T.StructField(counter, T.IntegerType()), EMPTY_FIELD]
    return map_columns(joined, apply, fields, drop=("_drop",)).cache()


def _line_owners(text: str) -> list[int]:
    """The paragraph of each line of ``text`` (``text.split("\\n")``), -1 for the blank lines inside a
    separator: a separator of ``k`` newlines holds ``k - 1`` of them between its paragraphs' lines."""
    units, seps = split_units(text, "paragraph")
    owner: list[int] = []
    for i, (unit, sep) in enumerate(zip(units, seps, strict=True)):
        owner += [i] * (unit.count("\n") + 1)
        owner += [-1] * max(0, sep.count("\n") - 1)
    return owner


def both_unit_keys(text: str, min_chars: int) -> list[dict]:
    """:func:`unit_keys` of the paragraphs (``unit`` 0) and the lines (``unit`` 1) of ``text`` at once; a
    line's ``pos`` is its index in ``text.split("\\n")`` and ``para`` the paragraph it is in (a
    paragraph's ``para`` is its ``pos``)."""
    return both_key_lists([text], min_chars)[0].as_py()


def both_key_lists(batch_texts: list[str], min_chars: int) -> pa.Array:
    """:func:`both_unit_keys` of every text, as one Arrow list array built from flat columns.

    Each line is normalised once: a paragraph's normal form is its lines' normal forms, the empty ones left
    out, joined by spaces. That is :func:`normalize` of the paragraph itself: NFKC neither composes nor
    reorders across a newline, lower-casing (final sigma included) stops at one, and the rest works
    character by character before the whitespace is collapsed. At 4,096 benchmark documents: 0.09 ms per
    document against 0.16 for normalising paragraphs and lines apart and converting a dict per unit."""
    unit: list[int] = []
    pos: list[int] = []
    para: list[int] = []
    keys: list[bytes] = []  # (digests, joined into one buffer of longs)
    counts: list[int] = []

    def add(kind: int, at: int, owner: int, norm: str) -> None:
        unit.append(kind)
        pos.append(at)
        para.append(owner)
        keys.append(_digest(norm))

    for text in batch_texts:
        before = len(keys)
        norms = normalize_lines(text)
        owner: list[int] = []
        parts = _PARAGRAPH_BREAK.split(text)
        for i, piece in enumerate(parts[0::2]):
            first, size = len(owner), piece.count("\n") + 1
            norm = " ".join(n for n in norms[first : first + size] if n)
            if len(norm) >= min_chars:
                add(0, i, i, norm)
            owner += [i] * size
            if 2 * i + 1 < len(parts):  # a separator of k newlines holds k - 1 blank lines
                owner += [-1] * (parts[2 * i + 1].count("\n") - 1)
        for j, norm in enumerate(norms):
            if len(norm) >= min_chars:
                add(1, j, owner[j], norm)
        counts.append(len(keys) - before)
    fields = [pa.array(unit, pa.int8()), pa.array(pos, pa.int32()), pa.array(para, pa.int32()),
              pa.array(np.frombuffer(b"".join(keys), dtype="<i8"))]
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays(fields, ["unit", "pos", "para", "key"]))


def drop_both(text: str, paragraphs: set[int], lines: set[int], min_chars: int) -> tuple[str, int, int, int]:
    """(text, paragraphs removed, lines removed, approximate tokens removed) of the paragraph pass and then the
    line pass, from the repeated paragraphs and the repeated lines (indices in ``text.split("\\n")``) both found
    on ``text``.

    The line pass sees the lines of the kept paragraphs only; :func:`_both` finds their first occurrences
    among those (a removed paragraph's lines are not its kept copy's lines when the two are wrapped
    differently: paragraphs are compared normalised). Its lines are found again in the paragraph pass's
    text by order: the lines of that text that can repeat (at least ``min_chars`` normalised) are those
    of the kept paragraphs, in order."""
    tokens = 0
    if paragraphs:
        owner = _line_owners(text)
        lines = {j for j in lines if owner[j] not in paragraphs}
        if lines:
            before = [j for j, norm in enumerate(normalize_lines(text))
                      if owner[j] not in paragraphs and len(norm) >= min_chars]
        tokens += unit_tokens(text, "paragraph", paragraphs)
        text = rebuild(text, "paragraph", paragraphs)
        if lines:
            after = [j for j, norm in enumerate(normalize_lines(text)) if len(norm) >= min_chars]
            where = dict(zip(before, after, strict=True))
            lines = {where[j] for j in lines}
    if lines:
        tokens += unit_tokens(text, "line", lines)
        text = rebuild(text, "line", lines)
    return text, len(paragraphs), len(lines), tokens


BOTH_TYPE = T.ArrayType(T.StructType([
    T.StructField("unit", T.ByteType()), T.StructField("pos", T.IntegerType()), T.StructField("para", T.IntegerType()),
    T.StructField("key", T.LongType()),
]))


def _repeats(units: DataFrame) -> DataFrame:
    """The units that are not the first occurrence (smallest row id, then position) of their key: one
    window on the key, one shuffle of the units."""
    first = F.min(F.struct("row_id", "pos")).over(Window.partitionBy("key"))
    return units.withColumn("first", first).filter(
        (F.col("first.row_id") != F.col("row_id")) | (F.col("first.pos") != F.col("pos"))).drop("first")


def _both(df: DataFrame, min_chars: int) -> DataFrame:
    """:func:`_pass` of the paragraphs and then of the lines, with one keying of the texts and one edit
    (:func:`drop_both`): the repeated paragraphs first, then the repeats among the lines of the paragraphs
    that stay, which are the lines the line pass would see."""
    def keys(batch: pa.RecordBatch) -> dict[str, pa.Array]:
        return {"_units": both_key_lists(texts(batch), min_chars)}

    keyed = map_columns(df.select("row_id", "text"), keys, [T.StructField("_units", BOTH_TYPE)], drop=("text",))
    units = (keyed.select("row_id", F.explode("_units").alias("u"))
             .select("row_id", "u.unit", "u.pos", "u.para", "u.key").cache())
    paragraphs = _repeats(units.filter(F.col("unit") == 0)).select("row_id", "pos")
    kept_lines = units.filter(F.col("unit") == 1).join(
        paragraphs.select("row_id", F.col("pos").alias("para")), ["row_id", "para"], "left_anti")
    lines = _repeats(kept_lines).select("row_id", "pos")
    repeats = (
        paragraphs.withColumn("unit", F.lit(0)).unionByName(lines.withColumn("unit", F.lit(1)))
        .groupBy("row_id")
        .agg(*(F.collect_list(F.when(F.col("unit") == unit, F.col("pos"))).alias(name)
               for unit, name in ((0, "_drop_paragraphs"), (1, "_drop_lines"))))
    )
    joined = df.join(repeats, "row_id", "left")

    def apply(batch: pa.RecordBatch) -> dict[str, list]:
        out: dict[str, list] = {"paragraphs_removed": [], "text": [], "ntok": [], "lines_removed": [], "_empty": []}
        columns = (texts(batch), texts(batch, "ntok"), texts(batch, "_drop_paragraphs"), texts(batch, "_drop_lines"))
        for text, ntok, paragraphs, lines in zip(*columns, strict=True):
            removed_paragraphs = removed_lines = 0
            if paragraphs or lines:
                text, removed_paragraphs, removed_lines, removed_tokens = drop_both(
                    text, set(paragraphs or ()), set(lines or ()), min_chars)
                ntok -= removed_tokens
            out["paragraphs_removed"].append(removed_paragraphs)
            out["text"].append(text)
            out["ntok"].append(ntok)
            out["lines_removed"].append(removed_lines)
            out["_empty"].append(_blank(text))
        return out

    fields = [T.StructField("paragraphs_removed", T.IntegerType()), T.StructField("text", T.StringType()),
              T.StructField("ntok", T.LongType()), T.StructField("lines_removed", T.IntegerType()), EMPTY_FIELD]
    return map_columns(joined, apply, fields, drop=("_drop_paragraphs", "_drop_lines"))


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.line_dedup
    if list(cfg.units) == ["paragraph", "line"]:
        out = _both(df, cfg.min_chars)
    else:
        out = df
        for unit in cfg.units:
            out = _pass(out, unit, cfg.min_chars)
    out = out.cache()
    kept = out.filter(~F.col("_empty")).drop("_empty")
    removed = removed_rows(out.filter(F.col("_empty")), F.lit("line_dedup: every unit repeated elsewhere"))
    return StageResult(kept, removed)
