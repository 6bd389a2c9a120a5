"""Read JSONL (optionally gzip) and Parquet inputs into documents, and bad records into a quarantine.

JSONL lines (split on ``\\n`` only) are read by Spark as raw bytes and parsed per Arrow batch, so every
per-record failure becomes a quarantine row with a reason instead of a crash or a silent drop: invalid
UTF-8, malformed JSON, nesting too deep for the parser, integers too long for Python, lone surrogates,
missing fields or fields of the wrong type, empty or huge documents, and anything else the parser raises.
A gzip file damaged part way keeps the records before the damage and names the damage (see
:mod:`haina.data_spark.gzip_lines`); :func:`check_quarantine_share` stops the job instead, for those who
ask. Row ids are assigned before parsing, in input order, and are the job's notion of
"first occurrence" (the smallest id of a duplicate group is kept).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.core.errors import HainaError, InputFileError, one_line
from haina.data_spark.arrow_batches import map_columns
from haina.data_spark.config import PrepareConfig
from haina.data_spark.gzip_lines import gzip_lines
from haina.data_spark.ingest_keys import key_fields, key_maker
from haina.data_spark.text import approx_tokens, detect_kind

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_BATCH_ROWS, _BATCH_BYTES = 4096, 32 << 20  # Arrow batches of a gzip reader

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


Fields = tuple[str | None, str | None, str | None, str | None]  # doc_id, source, url, text


class BadRecord(Exception):
    """One record that cannot become a document; the message is its quarantine reason, ``kind (detail)``."""


def _string(record: dict, key: str, ids: bool = False) -> str | None:
    """A field as text (None when absent or null); BadRecord for a value of another type."""
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    if ids and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    expected = "a string or a number" if ids else "a string"
    raise BadRecord(f"wrong field type ({key!r} is {type(value).__name__}, not {expected})")


def _check_unicode(key: str, value: str | None) -> None:
    """A JSON ``\\ud800`` escape decodes to a lone surrogate, which no UTF-8 writer (Arrow, Parquet) accepts."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(value[exc.start])
        raise BadRecord(f"invalid Unicode (lone surrogate U+{char:04X} in field {key!r} at character {exc.start})") from None


def _validate(record: object, cfg: PrepareConfig, escaped: bool = True) -> Fields:
    """(doc_id, source, url, text) of one decoded record, or BadRecord; ``escaped``: the line holds a
    ``\\u`` escape, the only way a lone surrogate gets in."""
    icfg = cfg.input
    if not isinstance(record, dict):
        raise BadRecord(f"not a JSON object ({type(record).__name__})")
    if record.get(icfg.text_key) is None:
        raise BadRecord(f"missing field {icfg.text_key!r}")
    text = record[icfg.text_key]
    if not isinstance(text, str):
        raise BadRecord(f"wrong field type ({icfg.text_key!r} is {type(text).__name__}, not a string)")
    doc_id = _string(record, icfg.id_key, ids=True)
    source = _string(record, icfg.source_key) or icfg.default_source
    url = _string(record, icfg.url_key)
    if escaped:
        for key, value in ((icfg.text_key, text), (icfg.id_key, doc_id), (icfg.source_key, source), (icfg.url_key, url)):
            _check_unicode(key, value)
    if len(text.strip()) < icfg.min_chars:
        raise BadRecord("empty document")
    if len(text) > icfg.max_chars:
        raise BadRecord(f"huge document ({len(text)} > {icfg.max_chars} characters)")
    return doc_id, source, url, text


def _json_error(exc: json.JSONDecodeError) -> str:
    """Some of json's messages end in "at" ("Unterminated string starting at"): the column completes them."""
    msg = exc.msg if exc.msg.endswith(" at") else f"{exc.msg} at"
    return f"malformed JSON ({msg} column {exc.colno})"


def damage_reason(damage: dict) -> str:
    """The quarantine reason of a damaged compressed file (the row holds the partial line, if any)."""
    return (f"damaged compressed file ({damage['error']} at compressed byte {damage['compressed_offset']}, "
            f"decompressed byte {damage['decompressed_offset']}; the {damage['lines_read']} lines before it are read)")


def parse_line(raw: bytes, cfg: PrepareConfig) -> Fields:
    """One JSONL line to (doc_id, source, url, text); :class:`BadRecord` with the reason for any failure,
    so that no single record, however broken, can end the job."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"invalid UTF-8 (byte {exc.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:  # (a ValueError: first)
        raise BadRecord(_json_error(exc)) from None
    except RecursionError:
        raise BadRecord("JSON nested too deeply (past Python's recursion limit)") from None
    except ValueError as exc:  # int() refuses integers longer than sys.get_int_max_str_digits()
        if "integer string conversion" in str(exc):
            raise BadRecord(f"number too large (an integer of more than {sys.get_int_max_str_digits()} digits)") from None
        raise BadRecord(f"malformed JSON ({one_line(exc)})") from None
    return _validate(record, cfg, escaped=b"\\u" in raw)


def _parse_jsonl(cfg: PrepareConfig, keys: bool = False) -> Callable[[pa.RecordBatch], dict[str, list]]:
    preview = cfg.input.raw_preview_chars
    source_kinds = dict(cfg.heuristics.source_kinds)
    make_keys = key_maker(cfg) if keys else None

    def parse(batch: pa.RecordBatch) -> dict[str, list]:
        out: dict[str, list] = {f.name: [] for f in DOC_FIELDS}
        damages = batch.column("damage").to_pylist()
        for raw, damage in zip(batch.column("value").to_pylist(), damages, strict=True):
            doc_id = source = url = text = kind = ntok = bad = None
            try:
                if damage is not None:
                    raise BadRecord(damage_reason(json.loads(damage)))
                doc_id, source, url, text = parse_line(raw, cfg)
                kind, ntok = _classify(text, source, source_kinds), approx_tokens(text)
            except BadRecord as exc:
                doc_id = source = url = text = kind = ntok = None
                bad = str(exc)
            except Exception as exc:  # anything else one record provokes: quarantined too, named by type
                doc_id = source = url = text = kind = ntok = None
                bad = f"unreadable record ({type(exc).__name__}: {one_line(exc)})"
            for name, value in (("doc_id", doc_id), ("source", source), ("url", url), ("text", text),
                                ("kind", kind), ("ntok", ntok), ("bad", bad)):
                out[name].append(value)
            out["raw"].append(raw[:preview].decode("utf-8", errors="replace") if bad else None)
        if make_keys is not None:
            out.update(make_keys(out["text"]))
        return out

    return parse


# The blank lines JSON Lines allows (Python's bytes.strip() whitespace), skipped before parsing.
_NOT_BLANK = "[^ \\t\\n\\r\\x0B\\f]"


def _read_jsonl(spark: SparkSession, path: Path) -> DataFrame:
    """Lines split on ``\\n`` only: Spark's default also splits on a bare ``\\r``, cutting records in two."""
    if path.name.lower().endswith(".gz"):
        return _read_gzip(spark, path)
    lines = spark.read.option("lineSep", "\n").text(str(path))
    lines = lines.select(F.col("value").cast("binary").alias("value"), F.lit(None).cast("string").alias("damage"))
    return lines.filter(F.col("value").cast("string").rlike(_NOT_BLANK))


def _read_gzip(spark: SparkSession, path: Path) -> DataFrame:
    """A gzip file in one task (gzip cannot be split anyway), inflated in Python: damage ends the file with
    a ``damage`` row instead of failing the job (see :mod:`haina.data_spark.gzip_lines`)."""
    name = str(path)
    schema = pa.schema([("value", pa.binary()), ("damage", pa.string())])

    def batch(values: list[bytes], damages: list[str | None]) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([pa.array(values, pa.binary()), pa.array(damages, pa.string())],
                                          schema=schema)

    def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        if not sum(b.num_rows for b in batches):
            return
        values: list[bytes] = []
        damages: list[str | None] = []
        size = 0
        for line, damage in gzip_lines(name):
            values.append(line)
            damages.append(None if damage is None else json.dumps(damage.as_dict()))
            size += len(line)
            if len(values) >= _BATCH_ROWS or size >= _BATCH_BYTES:
                yield batch(values, damages)
                values, damages, size = [], [], 0
        if values:
            yield batch(values, damages)

    return spark.range(0, 1, 1, numPartitions=1).mapInArrow(read, "value binary, damage string")


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
    return frame.select(record.cast("binary").alias("value"), F.lit(None).cast("string").alias("damage"))


def read_inputs(spark: SparkSession, inputs: list[Path], cfg: PrepareConfig, keys: bool = False) -> DataFrame:
    """Every input record, parsed: document columns plus ``bad`` (reason, or null) and ``raw`` (preview);
    with ``keys``, also the dedup columns of each document as it came in
    (:func:`haina.data_spark.ingest_keys.key_fields`), taken in the same pass over the records."""
    frames = []
    for path in inputs:
        frame = _read_parquet(spark, path, cfg) if input_kind(path) == "parquet" else _read_jsonl(spark, path)
        frames.append(frame.withColumn("file", F.lit(str(path))))
    raw = frames[0]
    for frame in frames[1:]:
        raw = raw.unionByName(frame)
    # Union keeps partitions in input order, so ids grow with the order of the inputs.
    raw = raw.withColumn("row_id", F.monotonically_increasing_id())
    fields = DOC_FIELDS + (key_fields(cfg) if keys else [])
    return map_columns(raw, _parse_jsonl(cfg, keys), fields, drop=("value",))


def documents(parsed: DataFrame, carried: tuple[str, ...] = ()) -> DataFrame:
    """Good records with ``DOC_COLUMNS`` and the ``carried`` ones (dedup columns ingest took); the row id
    stands in for a missing document id."""
    docs = parsed.filter(F.col("bad").isNull())
    return docs.withColumn("doc_id", F.coalesce(F.col("doc_id"), F.col("row_id").cast("string"))).select(
        *DOC_COLUMNS, *carried)


def quarantined(parsed: DataFrame) -> DataFrame:
    """Bad records: file, row id, reason and a preview of the raw bytes."""
    return parsed.filter(F.col("bad").isNotNull()).select("file", "row_id", F.col("bad").alias("reason"), "raw")


def damaged_files(parsed: DataFrame) -> list[dict]:
    """``[{file, error, compressed_offset, decompressed_offset, lines_read}]`` of the damaged gzip inputs."""
    rows = parsed.filter(F.col("damage").isNotNull()).select("file", "damage").collect()
    return sorted(({"file": r["file"], **json.loads(r["damage"])} for r in rows), key=lambda d: d["file"])


def quarantine_summary(bad: DataFrame) -> dict[str, int]:
    """Count per kind of reason: a reason reads ``kind (detail)``, and the kind is what comes before "("."""
    kind = F.trim(F.regexp_extract("reason", r"^([^(]+)", 1))
    rows = bad.groupBy(kind.alias("k")).count().orderBy("k").collect()
    return {r["k"]: int(r["count"]) for r in rows}


class TooManyBadRecords(InputFileError):
    """More of the input was quarantined than ``input.max_quarantine_share`` allows (exit status 2)."""


def check_quarantine_share(ingest: dict, cfg: PrepareConfig, quarantine: Path) -> None:
    """Stop the job (one line) when the quarantined share of the input records exceeds the limit."""
    limit = cfg.input.max_quarantine_share
    bad, total = ingest["quarantined"], ingest["quarantined"] + ingest["documents"]
    if limit is None or not total or bad / total <= limit:
        return
    common = sorted(ingest["quarantine_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    reasons = ", ".join(f"{kind} {count:,}" for kind, count in common)
    raise TooManyBadRecords(
        f"{bad:,} of {total:,} input records quarantined ({bad / total:.2%} > input.max_quarantine_share={limit}): "
        f"{reasons}; see {quarantine} (a rerun with a higher share resumes after ingest)"
    )
