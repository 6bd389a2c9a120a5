"""Stage 4: paragraph- and line-level exact dedup across the corpus; the first occurrence is kept.

Units are hashed per batch; finding each unit's first occurrence (smallest row id, then position)
is a native group-by and join, so Python never runs in the shuffle. Units shorter than
``min_chars`` are never removed: closing braces and short headings repeat legitimately.
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows
from haina.data_spark.text import approx_tokens, normalize

_PARAGRAPH_BREAK = re.compile(r"(\n(?:[ \t]*\n)+)")
UNIT_TYPE = T.ArrayType(T.StructType([T.StructField("pos", T.IntegerType()), T.StructField("key", T.BinaryType())]))


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
            out.append({"pos": pos, "key": hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()})
    return out


def rebuild(text: str, unit: str, drop: set[int]) -> str:
    units, seps = split_units(text, unit)
    kept = [(u, s) for i, (u, s) in enumerate(zip(units, seps, strict=True)) if i not in drop]
    return "".join(u + s for u, s in kept).strip("\n")


def _pass(df: DataFrame, unit: str, min_chars: int) -> DataFrame:
    def keys(batch: pa.RecordBatch) -> dict[str, list]:
        return {"_units": [unit_keys(t, unit, min_chars) for t in texts(batch)]}

    keyed = map_columns(df, keys, [T.StructField("_units", UNIT_TYPE)])
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
        out: dict[str, list] = {"text": [], "ntok": [], counter: []}
        for text, ntok, drop in zip(texts(batch), texts(batch, "ntok"), texts(batch, "_drop"), strict=True):
            if drop:
                text = rebuild(text, unit, set(drop))
                ntok = approx_tokens(text)
            out["text"].append(text)
            out["ntok"].append(ntok)
            out[counter].append(len(drop or ()))
        return out

    fields = [T.StructField("text", T.StringType()), T.StructField("ntok", T.LongType()),
              T.StructField(counter, T.IntegerType())]
    return map_columns(joined, apply, fields, drop=("_drop",)).cache()


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.line_dedup
    out = df
    for unit in cfg.units:
        out = _pass(out, unit, cfg.min_chars)
    out = out.cache()
    empty = F.length(F.trim("text")) == 0
    kept = out.filter(~empty)
    removed = removed_rows(out.filter(empty), F.lit("line_dedup: every unit repeated elsewhere"))
    return StageResult(kept, removed)
