"""Stage 6: dense embeddings (hashed n-gram random projection) clustered with k-means.

Nothing is removed here. Each document gets its cluster and the cluster's density (size over the
mean cluster size); weighting samples dense clusters less, which is how the report spends semantic
near-duplicates (same template, same topic) that MinHash does not catch.

The clustering is fitted on the driver, in numpy (k-means++ seeding, then Lloyd's iterations, float64),
on the vectors of at most ``FIT_SAMPLE`` documents: all of them below that, else those
with the smallest hash of their row id. A Spark ML fit ran a Spark job per iteration (and a dozen more to
seed), seconds of fixed cost whatever the corpus size; ``k x dim`` centres fitted on a hundred thousand
points are as good as on all. The sample is taken in row-id order, so the centres, and with them every
document's cluster, do not depend on the layout of the rows or the core count. Every document is then
assigned its nearest centre per Arrow batch, and cluster and density are joined onto its row: the texts
are neither shuffled nor sent back from Python, and the stage writes its rows in the layout it read them.
When the safety stage comes next, this pass also judges the texts for it (``safety.carried_verdicts``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, packed, texts, unpacked_column
from haina.data_spark.features import embed_many, projection
from haina.data_spark.stages import safety
from haina.data_spark.stages.base import StageContext, StageResult

PROJECTION_FEATURES = 1 << 16
FIT_SAMPLE = 100_000  # documents k-means is fitted on (all of them below that)
BROADCAST_LABELS = 5_000_000  # documents whose (row id, cluster, density) rows are broadcast to the join


def _squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """``(len(x), len(centers))`` squared Euclidean distances, float64. The products go through einsum's
    own loop, not BLAS, so each row's sums are added in one order whatever the batch it is in and the
    thread count (a BLAS kernel picks its blocking by the matrix's shape)."""
    products = np.einsum("ij,kj->ik", x, centers, optimize=False)
    return np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * products + np.einsum("ij,ij->i", centers, centers)[None, :]


def nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The index of each row's nearest centre (the lowest index on a tie)."""
    return np.argmin(_squared_distances(np.asarray(x, np.float64), centers), axis=1).astype(np.int32)


def cluster_sums(x: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The sum of the rows of each cluster, each cluster's rows added one after another in row order, as
    ``np.add.at`` adds them, bit for bit, in a fraction of its time (its unbuffered loop took 60% of a fit):
    the rows sorted by cluster, stably, and each run summed along its rows (a C-ordered reduction over the
    first axis adds the rows in order; ``reduceat`` does not)."""
    ordered = x[np.argsort(labels, kind="stable")]
    ends = np.cumsum(counts)
    sums = np.zeros((len(counts), x.shape[1]), dtype=x.dtype)
    for c in np.flatnonzero(counts):
        sums[c] = ordered[ends[c] - counts[c] : ends[c]].sum(axis=0)
    return sums


def fit_centers(x: np.ndarray, k: int, seed: int, max_iter: int) -> np.ndarray:
    """k-means centres of the rows of ``x``: k-means++ seeding from ``seed``, then at most ``max_iter``
    rounds of Lloyd's algorithm (stopping when no assignment changes; an empty cluster keeps its centre).
    Fewer than ``k`` centres when the rows have fewer distinct points. Deterministic for the same rows in
    the same order."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    chosen = [x[int(rng.integers(len(x)))]]
    closest = _squared_distances(x, chosen[0][None, :])[:, 0].clip(min=0.0)
    while len(chosen) < k:
        total = float(closest.sum())
        if total <= 0.0:
            break  # every point sits on a centre already
        pick = int(np.searchsorted(np.cumsum(closest), rng.random() * total, side="right"))
        chosen.append(x[min(pick, len(x) - 1)])
        closest = np.minimum(closest, _squared_distances(x, chosen[-1][None, :])[:, 0].clip(min=0.0))
    centers = np.array(chosen)
    labels = None
    for _ in range(max_iter):
        new = nearest(x, centers)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=len(centers))
        filled = counts > 0
        centers[filled] = cluster_sums(x, labels, counts)[filled] / counts[filled, None]
    return centers


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.embedding
    matrix = ctx.spark.sparkContext.broadcast(projection(PROJECTION_FEATURES, cfg.dim, cfg.seed))

    verdicts = safety.carried_verdicts(ctx)  # the safety stage's pass, when it comes next

    def vectors(batch: pa.RecordBatch) -> dict[str, list]:
        docs = texts(batch)
        vectors = embed_many(docs, matrix.value)
        out = {"_emb": packed(vectors.reshape(-1).astype("<f4"), np.full(len(vectors), vectors.shape[1]))}
        return out if verdicts is None else out | verdicts(docs, texts(batch, "ntok"))

    read = ["row_id", "text"] + (["ntok"] if verdicts is not None else [])
    fields = [T.StructField("_emb", T.BinaryType())] + (safety.CARRIED if verdicts is not None else [])
    points = map_columns(df.select(*read), vectors, fields, drop=("text", "ntok")).cache()
    n = points.count()
    k = max(1, min(cfg.k, n))
    if k < 2:
        out = df.withColumn("emb_cluster", F.lit(0)).withColumn("emb_density", F.lit(1.0))
        return StageResult(out, None, {"k": k})
    sample = points if n <= FIT_SAMPLE else points.orderBy(F.xxhash64("row_id"), "row_id").limit(FIT_SAMPLE)
    table = sample.toArrow()
    order = np.argsort(table.column("row_id").to_numpy(), kind="stable")
    flat = unpacked_column(table.column("_emb").combine_chunks(), "<f4")[0]
    centers = fit_centers(flat.reshape(len(order), cfg.dim)[order], k, cfg.seed, cfg.max_iter)
    shared = ctx.spark.sparkContext.broadcast(centers)

    def assign(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
        flat = unpacked_column(batch.column("_emb"), "<f4")[0]
        return {"emb_cluster": pa.array(nearest(flat.reshape(batch.num_rows, cfg.dim), shared.value))}

    labels = map_columns(points, assign, [T.StructField("emb_cluster", T.IntegerType())], drop=("_emb",)).cache()
    sizes = {r["emb_cluster"]: r["count"] for r in labels.groupBy("emb_cluster").count().collect()}
    mean_size = n / k
    density = F.create_map(*(F.lit(v) for c, size in sorted(sizes.items()) for v in (c, size / mean_size)))
    labels = labels.withColumn("emb_density", F.element_at(density, F.col("emb_cluster")).cast("double"))
    out = df.join(F.broadcast(labels) if n <= BROADCAST_LABELS else labels, "row_id")
    return StageResult(out, None, {"k": k, "fitted_on": min(n, FIT_SAMPLE)})
