"""Read JSONL (optionally gzip) and Parquet inputs into documents, and bad records into a quarantine.

JSONL lines are read by Spark as raw bytes and parsed per Arrow batch, so invalid UTF-8, malformed
JSON, missing fields and empty or huge documents become quarantine rows with a reason instead of a
crash or a silent drop. Row ids are assigned before parsing, in input order, and are the job's notion of
"first occurrence" (the smallest id of a duplicate group is kept).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.core.errors import HainaError, InputFileError, one_line
from haina.data_spark.arrow_batches import map_columns
from haina.data_spark.config import PrepareConfig
from haina.data_spark.text import approx_tokens, detect_kind

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")

DOC_FIELDS = [
    T.StructField("doc_id", T.StringType()),
    T.StructField("source", T.StringType()),
    T.StructField("url", T.StringType()),
    T.StructField("text", T.StringType()),
    T.StructField("kind", T.StringType()),
    T.StructField("ntok", T.LongType()),
    T.StructField("bad", T.StringType()),
    T.StructField("raw", T.StringType()),
]
DOC_COLUMNS = ["row_id", "doc_id", "source", "url", "file", "kind", "ntok", "text"]


def input_kind(path: Path) -> str:
    """``"jsonl"`` or ``"parquet"`` (a folder counts as Parquet); InputFileError in one line otherwise."""
    name = path.name.lower()
    if path.is_dir() or name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise InputFileError(f"{path}: unsupported input (expected {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})")


def check_inputs(inputs: list[Path]) -> list[Path]:
    """Every input must exist and have a known format: fail in a second, not after an hour."""
    if not inputs:
        raise HainaError("no input files given")
    out = []
    for path in inputs:
        path = Path(path).resolve()
        if not path.exists():
            raise InputFileError(f"{path}: input not found")
        input_kind(path)
        out.append(path)
    return out


def _classify(text: str, source: str, source_kinds: dict[str, str]) -> str:
    return source_kinds.get(source) or detect_kind(text)


def _validate(
    record: object, cfg: PrepareConfig
) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    """(doc_id, source, url, text, bad_reason) of one decoded record."""
    icfg = cfg.input
    if not isinstance(record, dict):
        return None, None, None, None, f"not a JSON object ({type(record).__name__})"
    if icfg.text_key not in record or record[icfg.text_key] is None:
        return None, None, None, None, f"missing field {icfg.text_key!r}"
    text = record[icfg.text_key]
    if not isinstance(text, str):
        return None, None, None, None, f"field {icfg.text_key!r} is {type(text).__name__}, not a string"
    if len(text.strip()) < icfg.min_chars:
        return None, None, None, None, "empty document"
    if len(text) > icfg.max_chars:
        return None, None, None, None, f"huge document ({len(text)} > {icfg.max_chars} characters)"
    doc_id = record.get(icfg.id_key)
    source = record.get(icfg.source_key) or icfg.default_source
    url = record.get(icfg.url_key)
    return (
        None if doc_id is None else str(doc_id),
        str(source),
        None if url is None else str(url),
        text,
        None,
    )


def _parse_jsonl(cfg: PrepareConfig):
    preview = cfg.input.raw_preview_chars
    source_kinds = dict(cfg.heuristics.source_kinds)

    def parse(batch: pa.RecordBatch) -> dict[str, list]:
        out: dict[str, list] = {f.name: [] for f in DOC_FIELDS}
        for raw in batch.column("value").to_pylist():
            bad = None
            doc_id = source = url = text = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = f"invalid UTF-8 at byte {exc.start}"
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad = f"malformed JSON ({exc.msg} at column {exc.colno})"
                else:
                    doc_id, source, url, text, bad = _validate(record, cfg)
            out["doc_id"].append(doc_id)
            out["source"].append(source)
            out["url"].append(url)
            out["text"].append(text)
            out["kind"].append(None if text is None else _classify(text, source, source_kinds))
            out["ntok"].append(None if text is None else approx_tokens(text))
            out["bad"].append(bad)
            out["raw"].append(raw[:preview].decode("utf-8", errors="replace") if bad else None)
        return out

    return parse


def _read_jsonl(spark: SparkSession, path: Path) -> DataFrame:
    lines = spark.read.text(str(path)).select(F.col("value").cast("binary").alias("value"))
    return lines.filter(F.length(F.trim(F.col("value").cast("string"))) > 0)


def _read_parquet(spark: SparkSession, path: Path, cfg: PrepareConfig) -> DataFrame:
    icfg = cfg.input
    try:
        frame = spark.read.parquet(str(path))
    except Exception as exc:  # Spark raises AnalysisException for unreadable files
        raise InputFileError(f"{path}: not a readable Parquet input ({one_line(exc)})") from None
    fields = {f.name: f.dataType for f in frame.schema.fields}
    if icfg.text_key not in fields:
        raise InputFileError(f"{path}: no {icfg.text_key!r} column (columns: {', '.join(sorted(fields)[:8])})")
    if not isinstance(fields[icfg.text_key], T.StringType):
        raise InputFileError(f"{path}: column {icfg.text_key!r} is {fields[icfg.text_key].simpleString()}, not string")

    def optional(key: str) -> F.Column:
        return F.col(key).cast("string") if key in fields else F.lit(None).cast("string")

    # Re-encode each row as one JSON line so Parquet and JSONL share one validation path.
    record = F.to_json(
        F.struct(
            F.col(icfg.text_key).alias(icfg.text_key),
            optional(icfg.id_key).alias(icfg.id_key),
            optional(icfg.source_key).alias(icfg.source_key),
            optional(icfg.url_key).alias(icfg.url_key),
        ),
        {"ignoreNullFields": "false"},
    )
    return frame.select(record.cast("binary").alias("value"))


def read_inputs(spark: SparkSession, inputs: list[Path], cfg: PrepareConfig) -> DataFrame:
    """Every input record, parsed: document columns plus ``bad`` (reason, or null) and ``raw`` (preview)."""
    frames = []
    for path in inputs:
        frame = _read_parquet(spark, path, cfg) if input_kind(path) == "parquet" else _read_jsonl(spark, path)
        frames.append(frame.withColumn("file", F.lit(str(path))))
    raw = frames[0]
    for frame in frames[1:]:
        raw = raw.unionByName(frame)
    # Union keeps partitions in input order, so ids grow with the order of the inputs.
    raw = raw.withColumn("row_id", F.monotonically_increasing_id())
    return map_columns(raw, _parse_jsonl(cfg), DOC_FIELDS, drop=("value",))


def documents(parsed: DataFrame) -> DataFrame:
    """Good records with ``DOC_COLUMNS``; the row id stands in for a missing document id."""
    docs = parsed.filter(F.col("bad").isNull())
    return docs.withColumn("doc_id", F.coalesce(F.col("doc_id"), F.col("row_id").cast("string"))).select(*DOC_COLUMNS)


def quarantined(parsed: DataFrame) -> DataFrame:
    """Bad records: file, row id, reason and a preview of the raw bytes."""
    return parsed.filter(F.col("bad").isNotNull()).select("file", "row_id", F.col("bad").alias("reason"), "raw")
