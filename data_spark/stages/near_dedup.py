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

The decision is taken on the documents as they came in: ingest signs each document's normalised text
(:mod:`haina.data_spark.ingest_keys`) and keeps the columns in its stage folder, and this stage joins
them onto the row ids that reach it, so two copies that the C4 rules, the quality classifier or line
dedup trimmed differently are compared as they were. Run on its own (no ingest), the stage signs the
text it receives. The removed copies'
reason gives their Jaccard to the representative, and the report lists the first clusters
(``report_clusters``): the kept representative and its removed copies with their similarity.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.config import NearDedupConfig
from haina.data_spark.connected_components import components as connected
from haina.data_spark.ingest_keys import BANDS_FIELD, HV_FIELD, SIG_FIELD, Signer, carried, unpacked
from haina.data_spark.stages.base import StageContext, StageResult, broadcast_if_small, removed_rows

SIG_FIELDS = [SIG_FIELD, BANDS_FIELD, HV_FIELD]
REPORT_COPIES = 10  # removed copies listed per reported cluster (all are counted)


def signatures(df: DataFrame, cfg: NearDedupConfig, column: str = "text", with_signature: bool | None = None
               ) -> tuple[DataFrame, int, int]:
    """Add ``_sig``, ``_bands`` and, for exact verification, the distinct shingle hashes ``_hv`` of ``column``
    per document (:meth:`Signer.sign_batch`); all null for documents without tokens. ``_sig`` is filled
    only when something reads it (``verify`` is not ``exact``, or ``with_signature``): 256 numbers per
    document that exact verification never looks at need not cross from Python to the JVM."""
    signer = Signer.create(cfg)
    exact = cfg.verify == "exact"
    keep_sig = not exact if with_signature is None else with_signature

    def sign(batch: pa.RecordBatch) -> dict[str, pa.Array]:
        sigs, keys, hvs = signer.sign_batch(texts(batch, column))
        return {"_sig": sigs if keep_sig else pa.nulls(len(sigs), sigs.type), "_bands": keys,
                "_hv": hvs if exact else pa.nulls(len(hvs), hvs.type)}

    return map_columns(df, sign, SIG_FIELDS), signer.bands, signer.rows


def candidate_edges(signed: DataFrame) -> DataFrame:
    """``(src, dst)``: each member of an LSH bucket linked to the bucket's smallest id.

    Nearly every bucket holds one document, so a hash aggregate of fixed-width values (smallest id, size)
    per bucket finds the shared ones, and only their members are linked, by joining the few shared buckets
    back onto the band keys (:func:`broadcast_if_small`: the band keys are not shuffled again). Gathering
    every bucket's ids in a list instead took Spark's sort-based fallback of the object aggregate, which
    sorted a million band keys twice (3 of the stage's 9.5 s at 50,000 documents)."""
    exploded = signed.filter(F.col("_bands").isNotNull()).select(
        "row_id", F.posexplode("_bands").alias("band", "key")
    )
    shared = (exploded.groupBy("band", "key").agg(F.min("row_id").alias("dst"), F.count("*").alias("size"))
              .filter(F.col("size") > 1).drop("size"))
    members = exploded.join(broadcast_if_small(shared), ["band", "key"])
    return members.filter(F.col("row_id") != F.col("dst")).select(F.col("row_id").alias("src"), "dst").distinct()


def pair_similarities(a: list[bytes], b: list[bytes], cfg: NearDedupConfig) -> list[float]:
    """Jaccard of each pair of documents from their packed ``_hv`` (``verify: exact``: the shingle sets,
    exactly) or ``_sig`` columns (else: estimated from the share of agreeing signature values)."""
    if cfg.verify == "exact":
        out = []
        for x, y in zip(a, b, strict=True):
            hx, hy = unpacked(x), unpacked(y)  # each sorted and distinct
            inter = len(np.intersect1d(hx, hy, assume_unique=True))
            out.append(inter / (len(hx) + len(hy) - inter))
        return out
    return [float(np.mean(unpacked(x) == unpacked(y))) for x, y in zip(a, b, strict=True)]


def _verify_column(cfg: NearDedupConfig) -> str:
    return "_hv" if cfg.verify == "exact" else "_sig"


def _with_similarity(pairs: DataFrame, cfg: NearDedupConfig) -> DataFrame:
    """``pairs`` (with the two documents' columns as ``a`` and ``b``) with their ``_similarity``, taken in
    Python: only candidate pairs get here, a few thousand in 50,000 documents."""
    def similarity(batch: pa.RecordBatch) -> dict[str, list]:
        return {"_similarity": pair_similarities(texts(batch, "a"), texts(batch, "b"), cfg)}

    return map_columns(pairs, similarity, [T.StructField("_similarity", T.DoubleType())], drop=("a", "b"))


def _pairs(left: DataFrame, left_id: str, right_id: str, signed: DataFrame, cfg: NearDedupConfig) -> DataFrame:
    """``left`` with the verification column of its ``left_id`` and ``right_id`` documents as ``a``, ``b``."""
    column = _verify_column(cfg)
    side = signed.select("row_id", column)
    return left.join(side.withColumnRenamed("row_id", left_id).withColumnRenamed(column, "a"), left_id).join(
        side.withColumnRenamed("row_id", right_id).withColumnRenamed(column, "b"), right_id)


def verified(edges: DataFrame, signed: DataFrame, cfg: NearDedupConfig) -> DataFrame:
    """Keep the candidate edges whose similarity reaches the threshold (all of them with ``verify: none``)."""
    if cfg.verify == "none":
        return edges
    scored = _with_similarity(_pairs(edges, "src", "dst", signed, cfg), cfg)
    return scored.filter(F.col("_similarity") >= F.lit(cfg.threshold)).select("src", "dst")


def copies(components: DataFrame, signed: DataFrame, cfg: NearDedupConfig) -> DataFrame:
    """``(id, component, similarity)`` of the members to remove: not the representative, and within the
    threshold of it (checked directly, since the component may have joined them through a chain)."""
    members = components.filter(F.col("id") != F.col("component"))
    scored = _with_similarity(_pairs(members, "id", "component", signed, cfg), cfg)
    if cfg.verify != "none":
        scored = scored.filter(F.col("_similarity") >= F.lit(cfg.threshold))
    return scored.select("id", "component", F.col("_similarity").alias("similarity"))


def _reason(cfg: NearDedupConfig) -> Column:
    what = "Jaccard" if cfg.verify == "exact" else "estimated Jaccard"
    return F.format_string(f"near duplicate ({what} %.3f)", F.col("_similarity"))


def cluster_report(removal: DataFrame, signed: DataFrame, cfg: NearDedupConfig, texts_are: str) -> dict[str, object]:
    """Counts, and the first ``report_clusters`` clusters (by representative row id) with a removed copy:
    the kept representative and up to ``REPORT_COPIES`` of its removed copies with their similarity."""
    what = ("exact Jaccard of the shingle sets" if cfg.verify == "exact"
            else "Jaccard estimated from signature agreement") + f", on the {texts_are}"
    totals = removal.agg(F.countDistinct("_copy_of").alias("clusters"), F.count("*").alias("copies")).first()
    out: dict[str, object] = {"similarity": what, "clusters": int(totals["clusters"]), "copies": int(totals["copies"])}
    if not cfg.report_clusters or not totals["copies"]:
        out["examples"] = []
        return out
    firsts = [r["_copy_of"] for r in removal.select("_copy_of").distinct().orderBy("_copy_of").limit(cfg.report_clusters).collect()]
    ids = signed.select("row_id", "doc_id")
    rows = (
        removal.filter(F.col("_copy_of").isin(firsts))
        .join(ids, "row_id")
        .join(ids.select(F.col("row_id").alias("_copy_of"), F.col("doc_id").alias("_kept_doc")), "_copy_of")
        .select("row_id", "doc_id", "_copy_of", "_kept_doc", "_similarity")
        .collect()
    )
    clusters: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: (r["_copy_of"], r["row_id"])):
        cluster = clusters.setdefault(r["_copy_of"], {"kept": {"row_id": r["_copy_of"], "doc_id": r["_kept_doc"]},
                                                      "copies": [], "copies_total": 0})
        cluster["copies_total"] += 1
        if len(cluster["copies"]) < REPORT_COPIES:
            cluster["copies"].append({"row_id": r["row_id"], "doc_id": r["doc_id"],
                                      "similarity": round(float(r["_similarity"]), 4)})
    out["examples"] = [clusters[c] for c in sorted(clusters)]
    return out


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.near_dedup
    from_ingest = carried(ctx.near_keys, cfg)
    if from_ingest:  # ingest's columns of the documents that reach this stage
        signer = Signer.create(cfg)
        signed, bands, rows = df.select("row_id", "doc_id").join(ctx.near_keys, "row_id"), signer.bands, signer.rows
    else:  # run on its own: sign the text as it is now
        signed, bands, rows = signatures(df.select("row_id", "doc_id", "text"), cfg)
    signed = signed.cache()
    edges = verified(candidate_edges(signed), signed, cfg)
    cc: dict[str, int] = {}
    components = connected(edges, cfg.max_iterations, stats=cc).cache()
    sizes = components.groupBy("component").agg(F.count("*").alias("near_dup_size"))
    removal = copies(components, signed, cfg).select(
        F.col("id").alias("row_id"), F.col("component").alias("_copy_of"), F.col("similarity").alias("_similarity")
    ).cache()
    labelled = (
        df
        .join(components.withColumnRenamed("id", "row_id"), "row_id", "left")
        .join(sizes, "component", "left")
        .withColumn("near_dup_size", F.coalesce("near_dup_size", F.lit(1)).cast("int"))
        .join(removal, "row_id", "left")
        .drop("component")
        .cache()
    )
    is_copy = F.col("_copy_of").isNotNull()
    kept = labelled.filter(~is_copy).drop("_copy_of", "_similarity")
    removed = removed_rows(labelled.filter(is_copy), _reason(cfg), F.col("_copy_of"))
    texts_are = "texts as ingested" if from_ingest else "texts as this stage received them"
    notes = {"bands": bands, "rows": rows, "num_perm": cfg.num_perm, "signed": texts_are,
             "components_rounds": cc["rounds"], "links": cc["edges"],
             "near_duplicates": cluster_report(removal, signed, cfg, texts_are)}
    return StageResult(kept, removed, notes)
