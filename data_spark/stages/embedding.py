"""Stage 6: dense embeddings (hashed n-gram random projection) clustered with Spark ML k-means.

Nothing is removed here. Each document gets its cluster and the cluster's density (size over the
mean cluster size); weighting samples dense clusters less, which is how the report spends semantic
near-duplicates (same template, same topic) that MinHash does not catch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyspark.ml.clustering import KMeans
from pyspark.ml.functions import array_to_vector
from pyspark.sql import functions as F
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import map_columns, texts
from haina.data_spark.features import embed_many, projection
from haina.data_spark.stages.base import StageContext, StageResult

PROJECTION_FEATURES = 1 << 16


def run(df, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.embedding
    matrix = ctx.spark.sparkContext.broadcast(projection(PROJECTION_FEATURES, cfg.dim, cfg.seed))

    def vectors(batch: pa.RecordBatch) -> dict[str, list]:
        vectors = embed_many(texts(batch), matrix.value)
        dim = vectors.shape[1]
        starts = pa.array(np.arange(len(vectors) + 1, dtype=np.int32) * dim)
        return {"_emb": pa.ListArray.from_arrays(starts, pa.array(vectors.reshape(-1)))}

    embedded = map_columns(df, vectors, [T.StructField("_emb", T.ArrayType(T.FloatType()))])
    # k-means|| samples per partition in order: a canonical layout makes the clustering reproducible.
    embedded = (
        embedded.withColumn("_vec", array_to_vector("_emb"))
        .drop("_emb")
        .repartition(ctx.cfg.spark.shuffle_partitions, "row_id")
        .sortWithinPartitions("row_id")
        .cache()
    )
    n = embedded.count()
    k = max(1, min(cfg.k, n))
    if k < 2:
        out = embedded.withColumn("emb_cluster", F.lit(0)).withColumn("emb_density", F.lit(1.0))
        return StageResult(out.drop("_vec"), None, {"k": k})
    model = KMeans(k=k, seed=cfg.seed, maxIter=cfg.max_iter, featuresCol="_vec", predictionCol="emb_cluster")
    clustered = model.fit(embedded).transform(embedded).drop("_vec")
    sizes = clustered.groupBy("emb_cluster").agg(F.count("*").alias("_size"))
    mean_size = n / k
    out = (
        clustered.join(F.broadcast(sizes), "emb_cluster")
        .withColumn("emb_density", (F.col("_size") / F.lit(mean_size)).cast("double"))
        .withColumn("emb_cluster", F.col("emb_cluster").cast("int"))
        .drop("_size")
    )
    return StageResult(out, None, {"k": k})
