"""Connected components: on the driver when the edges are few, else on native Spark columns.

Near-dedup's verified links are few next to the documents (a link per copy, not per document), so up to
``DRIVER_EDGES`` of them come to the driver and SciPy labels the components in one pass
(:func:`components`), instead of a handful of Spark rounds of joins and group-bys, each several jobs,
which cost seconds whatever the corpus size. Beyond that, :func:`connected_components` runs in Spark:
min-label propagation with pointer jumping. Each round every node takes the smallest label among itself
and its neighbours (a join and a group-by), then jumps to its label's label, which halves path lengths,
so a chain of n nodes needs about log2(n) rounds instead of n. Either way every node carries the
smallest id of its component.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from haina.core.errors import ConfigError

DRIVER_EDGES = 4_000_000  # 64 MiB of int64 pairs on the driver at most


def components(edges: DataFrame, max_iterations: int = 40, stats: dict[str, Any] | None = None,
               driver_edges: int = DRIVER_EDGES) -> DataFrame:
    """``(id, component)`` for every node of the undirected ``edges(src, dst)`` (component = min id), the
    same as :func:`connected_components`: on the driver (SciPy) when there are at most ``driver_edges``
    edges, else in Spark. ``stats`` receives ``rounds`` (0 on the driver) and ``edges``."""
    edges = edges.select("src", "dst").cache()
    count = edges.count()
    if stats is not None:
        stats["edges"] = count
    if count > driver_edges:
        return connected_components(edges, max_iterations, stats)
    table = edges.toArrow()
    edges.unpersist()
    if stats is not None:
        stats["rounds"] = 0
    src = table.column("src").to_numpy(zero_copy_only=False).astype(np.int64)
    dst = table.column("dst").to_numpy(zero_copy_only=False).astype(np.int64)
    ids, component = label_components(src, dst)
    spark = edges.sparkSession
    schema = "id long, component long"
    if not len(ids):
        return spark.createDataFrame([], schema)
    return spark.createDataFrame(pa.table({"id": ids, "component": component}), schema)


def label_components(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node ids ascending, the smallest id of each one's component) of the undirected edges ``src - dst``
    (self-loops ignored, as :func:`connected_components` ignores them)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    keep = src != dst
    src, dst = src[keep], dst[keep]
    ids, index = np.unique(np.concatenate([src, dst]), return_inverse=True)
    if not len(ids):
        return ids, ids.copy()
    n, m = len(ids), len(src)
    graph = coo_matrix((np.ones(m, dtype=np.int8), (index[:m], index[m:])), shape=(n, n))
    _, labels = scipy_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, labels, ids)
    return ids, smallest[labels]


def connected_components(edges: DataFrame, max_iterations: int = 40, stats: dict[str, Any] | None = None) -> DataFrame:
    """``(id, component)`` for every node of the undirected ``edges(src, dst)``; component = min id.

    ``stats`` (if given) receives ``rounds``. Labels still changing after ``max_iterations`` rounds are
    refused in one line (a partial labelling would split components and keep copies)."""
    both = edges.select("src", "dst").union(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    both = both.filter(F.col("src") != F.col("dst")).distinct().localCheckpoint()
    labels = both.groupBy("src").agg(F.least(F.min("dst"), F.first("src")).alias("label"))
    labels = labels.withColumnRenamed("src", "id").localCheckpoint()
    rounds, converged = 0, False
    for _ in range(max_iterations):
        rounds += 1
        neighbour = (
            both.join(labels.withColumnRenamed("id", "dst").withColumnRenamed("label", "nlabel"), "dst")
            .groupBy("src")
            .agg(F.min("nlabel").alias("nlabel"))
            .withColumnRenamed("src", "id")
        )
        spread = labels.join(neighbour, "id").select("id", F.least("label", "nlabel").alias("label"))
        jumped = (
            spread.alias("a")
            .join(spread.alias("b"), F.col("a.label") == F.col("b.id"))
            .select(F.col("a.id").alias("id"), F.least(F.col("a.label"), F.col("b.label")).alias("label"))
            .localCheckpoint()
        )
        changed = jumped.join(labels.withColumnRenamed("label", "old"), "id").filter(F.col("label") != F.col("old"))
        labels = jumped
        if changed.isEmpty():
            converged = True
            break
    if stats is not None:
        stats["rounds"] = rounds
    if not converged and not both.isEmpty():
        raise ConfigError(
            f"near_dedup.max_iterations={max_iterations}: connected components still changing after "
            f"{max_iterations} rounds; raise it"
        )
    return labels.withColumnRenamed("label", "component")
