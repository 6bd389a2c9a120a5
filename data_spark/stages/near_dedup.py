"""Stage 5: document near-dedup with MinHash LSH; one document per component survives.

Rule: documents whose signatures share a band (bands/rows from datasketch's optimisation for
``lsh_threshold``, set below the duplicate threshold to buy recall) and whose Jaccard, checked exactly
on the shingle hashes, reaches ``threshold`` are linked; connected components of these links are
near-duplicate clusters, and the smallest row id of a cluster is its representative. A member is removed
("part removed") only if it is itself within ``threshold`` of the representative: links are transitive
and a chain A~B~C can join two texts far apart, so a member reached only through another one stays.
Every removed document therefore has a kept document at Jaccard >= threshold. The kept ones record the
cluster size, which the weighting stage turns into a factor ``size ** near_dedup.dup_weight_exponent``
("the rest scored"), so a widely copied text keeps some of its weight without being trained on many
times.

Signatures are taken over the text as it entered line dedup (kept in ``_full_text``): that stage
strips the paragraphs a later copy shares with an earlier one, which would otherwise hide exactly the
document-level duplication this stage exists to find.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.config import NearDedupConfig
from haina.data_spark.connected_components import connected_components
from haina.data_spark.minhash import MinHasher, band_keys, lsh_params, shingles
from haina.data_spark.stages.base import StageContext, StageResult, removed_rows

SIG_FIELDS = [
    T.StructField("_sig", T.ArrayType(T.IntegerType())),
    T.StructField("_bands", T.ArrayType(T.LongType())),
    T.StructField("_hv", T.ArrayType(T.IntegerType())),
]


def signatures(df: DataFrame, cfg: NearDedupConfig) -> tuple[DataFrame, int, int]:
    """Add ``_sig`` (uint32 viewed as int32), ``_bands`` and, for exact verification, the sorted shingle
    hashes ``_hv`` per document; all null for documents without tokens."""
    bands, rows = lsh_params(cfg.lsh_threshold, cfg.num_perm, cfg.false_positive_weight, cfg.false_negative_weight)
    exact = cfg.verify == "exact"
    hasher = MinHasher.create(cfg.num_perm, cfg.seed, cfg.scheme)
    size = cfg.shingle_size
    column = "_full_text" if "_full_text" in df.columns else "text"

    def sign(batch: pa.RecordBatch) -> dict[str, list]:
        sigs, keys, hvs = [], [], []
        for text in texts(batch, column):
            items = shingles(text, size)
            hv = hasher.hashes(items)
            signature = hasher.signature(items, hv)
            if signature is None:
                sigs.append(None)
                keys.append(None)
                hvs.append(None)
            else:
                sigs.append(signature.view(np.int32).tolist())
                keys.append(band_keys(signature, bands, rows))
                hvs.append(np.unique(hv).view(np.int32).tolist() if exact else None)
        return {"_sig": sigs, "_bands": keys, "_hv": hvs}

    return map_columns(df, sign, SIG_FIELDS), bands, rows


def candidate_edges(signed: DataFrame) -> DataFrame:
    """``(src, dst)``: each member of an LSH bucket linked to the bucket's smallest id (native group-by)."""
    exploded = signed.filter(F.col("_bands").isNotNull()).select(
        "row_id", F.posexplode("_bands").alias("band", "key")
    )
    buckets = exploded.groupBy("band", "key").agg(F.min("row_id").alias("dst"), F.count("*").alias("n"))
    buckets = buckets.filter(F.col("n") > 1)
    return (
        exploded.join(buckets, ["band", "key"])
        .filter(F.col("row_id") != F.col("dst"))
        .select(F.col("row_id").alias("src"), "dst")
        .distinct()
    )


def similar(a: str, b: str, cfg: NearDedupConfig) -> Column:
    """Whether two documents' ``a``/``b`` columns (``_hv`` or ``_sig``, per ``cfg.verify``) reach the
    threshold: exact Jaccard of shingle hashes (``array_intersect`` on native arrays) or estimated from
    signature agreement; always true with ``verify: none``."""
    if cfg.verify == "none":
        return F.lit(True)
    if cfg.verify == "exact":
        inter = F.size(F.array_intersect(a, b))
        similarity = inter / (F.size(a) + F.size(b) - inter)
    else:
        similarity = F.size(F.filter(F.zip_with(a, b, lambda x, y: x == y), lambda e: e)) / F.lit(cfg.num_perm)
    return similarity >= F.lit(cfg.threshold)


def _verify_column(cfg: NearDedupConfig) -> str:
    return "_hv" if cfg.verify == "exact" else "_sig"


def verified(edges: DataFrame, signed: DataFrame, cfg: NearDedupConfig) -> DataFrame:
    """Keep the candidate edges whose similarity reaches the threshold."""
    column = _verify_column(cfg)
    side = signed.select("row_id", column)
    pairs = edges.join(side.withColumnRenamed("row_id", "src").withColumnRenamed(column, "a"), "src").join(
        side.withColumnRenamed("row_id", "dst").withColumnRenamed(column, "b"), "dst"
    )
    return pairs.filter(similar("a", "b", cfg)).select("src", "dst")


def copies(components: DataFrame, signed: DataFrame, cfg: NearDedupConfig) -> DataFrame:
    """``(id, component)`` of the members to remove: not the representative, and within the threshold of
    it (checked directly, since the component may have joined them through a chain)."""
    column = _verify_column(cfg)
    side = signed.select("row_id", column)
    members = components.filter(F.col("id") != F.col("component"))
    pairs = members.join(side.withColumnRenamed("row_id", "id").withColumnRenamed(column, "a"), "id").join(
        side.withColumnRenamed("row_id", "component").withColumnRenamed(column, "b"), "component"
    )
    return pairs.filter(similar("a", "b", cfg)).select("id", "component")


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.near_dedup
    signed, bands, rows = signatures(df, cfg)
    signed = signed.cache()
    edges = candidate_edges(signed)
    if cfg.verify != "none":
        edges = verified(edges, signed, cfg)
    components = connected_components(edges, cfg.max_iterations).cache()
    sizes = components.groupBy("component").agg(F.count("*").alias("near_dup_size"))
    removal = copies(components, signed, cfg).select(F.col("id").alias("row_id"), F.col("component").alias("_copy_of"))
    labelled = (
        signed.drop("_sig", "_bands", "_hv", "_full_text")
        .join(components.withColumnRenamed("id", "row_id"), "row_id", "left")
        .join(sizes, "component", "left")
        .withColumn("near_dup_size", F.coalesce("near_dup_size", F.lit(1)).cast("int"))
        .join(removal, "row_id", "left")
        .drop("component")
        .cache()
    )
    is_copy = F.col("_copy_of").isNotNull()
    kept = labelled.filter(~is_copy).drop("_copy_of")
    removed = removed_rows(labelled.filter(is_copy), F.lit("near duplicate"), F.col("_copy_of"))
    return StageResult(kept, removed, {"bands": bands, "rows": rows, "num_perm": cfg.num_perm})
