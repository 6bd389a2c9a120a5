"""Tokenize kept documents in Spark into Megatron ``.bin``/``.idx`` shards and describe them in ``blend.json``.

Documents are grouped by (category, weight bucket); each Spark partition writes one part per group it
holds with megatron-core's ``IndexedDatasetBuilder`` on the executor, so tokenization scales with the
cluster. A part's blend weight is its weighted token mass, sum(weight x tokens), over the total: the
blended dataset then samples every token in proportion to its document's weight, up to bucketing.
The output folder must be a filesystem every executor can write (as megatron's readers need anyway).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

from haina.core.errors import HainaError, InputFileError
from haina.core.files import write_durable
from haina.core.tokenizer import Tokenizer
from haina.data_spark.tokenize import UINT16_VOCAB_LIMIT, _builder_class

PART_SCHEMA = "category string, bucket string, prefix string, documents long, tokens long, weighted double"


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) or "_"


def _writer(model_path: str, root: str, append_eos: bool):
    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import SparkFiles, TaskContext

        local = model_path if os.path.isfile(model_path) else SparkFiles.get(os.path.basename(model_path))
        tokenizer = Tokenizer(local)
        dtype = np.uint16 if tokenizer.vocab_size < UINT16_VOCAB_LIMIT else np.int32
        eos = [tokenizer.eos_id] if append_eos else []
        part = TaskContext.get().partitionId()
        groups: dict[tuple[str, str], dict] = {}
        for batch in batches:
            cols = {name: batch.column(name).to_pylist() for name in ("category", "bucket", "weight", "text")}
            encoded = tokenizer.encode_batch(cols["text"], num_threads=1)
            for category, bucket, weight, ids in zip(
                cols["category"], cols["bucket"], cols["weight"], encoded, strict=True
            ):
                key = (category, bucket)
                if key not in groups:
                    prefix = Path(root) / safe_name(category) / safe_name(bucket) / f"part-{part:05d}"
                    prefix.parent.mkdir(parents=True, exist_ok=True)
                    groups[key] = {"prefix": prefix, "docs": 0, "tokens": 0, "weighted": 0.0,
                                   "builder": _builder_class()(f"{prefix}.bin", dtype=dtype)}
                group = groups[key]
                ids = [*ids, *eos]
                group["builder"].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                group["docs"] += 1
                group["tokens"] += len(ids)
                group["weighted"] += weight * len(ids)
        rows: dict[str, list] = {"category": [], "bucket": [], "prefix": [], "documents": [], "tokens": [],
                                 "weighted": []}
        for (category, bucket), group in sorted(groups.items()):
            group["builder"].finalize(f"{group['prefix']}.idx")
            for name, value in (("category", category), ("bucket", bucket), ("prefix", str(group["prefix"])),
                                ("documents", group["docs"]), ("tokens", group["tokens"]),
                                ("weighted", group["weighted"])):
                rows[name].append(value)
        if rows["prefix"]:
            yield pa.RecordBatch.from_pydict(rows)

    return write


def write_shards(
    spark: SparkSession, kept: DataFrame, out_dir: Path, model: Path, *, partitions: int, append_eos: bool = True
) -> dict:
    """Write ``out_dir/tokenized/<category>/<bucket>/part-N.{bin,idx}`` and ``out_dir/blend.json``."""
    model = Path(model).resolve()
    if not model.is_file():
        raise InputFileError(f"{model}: tokenizer model not found")
    spark.sparkContext.addFile(str(model))
    root = Path(out_dir) / "tokenized"
    frame = (
        kept.select("row_id", "category", "bucket", "weight", "text")
        .repartition(partitions, "category", "bucket")
        .sortWithinPartitions("category", "bucket", "row_id")
    )
    parts = frame.mapInArrow(_writer(str(model), str(root), append_eos), PART_SCHEMA).orderBy(
        "category", "bucket", "prefix"
    ).collect()
    return write_blend(out_dir, [r.asDict() for r in parts])


def write_blend(out_dir: Path, parts: list[dict]) -> dict:
    """``blend.json``: one entry per part with its prefix relative to ``out_dir`` and normalized weight."""
    total = sum(p["weighted"] for p in parts)
    if not parts or total <= 0:
        raise HainaError("no tokens to blend: every document was removed")
    datasets = [
        {
            "prefix": os.path.relpath(p["prefix"], out_dir),
            "weight": p["weighted"] / total,
            "category": p["category"],
            "bucket": p["bucket"],
            "documents": int(p["documents"]),
            "tokens": int(p["tokens"]),
        }
        for p in parts
    ]
    blend = {"datasets": datasets}
    write_durable(Path(out_dir) / "blend.json", json.dumps(blend, indent=2) + "\n")
    return blend


def blend_summary(blend: dict) -> dict:
    """Token and weight totals per category, for the report."""
    out: dict[str, dict] = {}
    for entry in blend["datasets"]:
        row = out.setdefault(entry["category"], {"parts": 0, "documents": 0, "tokens": 0, "weight": 0.0})
        row["parts"] += 1
        row["documents"] += entry["documents"]
        row["tokens"] += entry["tokens"]
        row["weight"] = round(row["weight"] + entry["weight"], 6)
    return out

