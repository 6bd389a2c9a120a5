"""Connected components on native Spark columns: min-label propagation with pointer jumping.

Each round every node takes the smallest label among itself and its neighbours (a join and a
group-by), then jumps to its label's label, which halves path lengths, so a chain of n nodes needs
about log2(n) rounds instead of n. At the fixpoint every node carries the smallest id of its component.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from haina.core.errors import ConfigError


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
