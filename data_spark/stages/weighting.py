"""Stage 9: the per-document sampling weight and its bucket.

``raw = quality_score ** quality_exponent * near_dup_size ** dup_weight_exponent
* emb_density ** -density_exponent * upsample(source)``, clipped to [min_weight, max_weight]; then one
factor per category with a target so that categories' weighted token shares equal the targets
(unnamed categories share the rest in their natural proportions); finally scaled so the token-weighted
mean weight is 1. A weight of 2 means "seen twice as often per token as an average document".
"""

from __future__ import annotations

import math

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from haina.data_spark.stages.base import StageContext, StageResult

EXACT = "decimal(38,12)"  # weight * tokens below 1e26, kept to 1e-12


def _upsample(factors: dict[str, float]) -> Column:
    expr: Column = F.lit(1.0)
    for source, factor in sorted(factors.items()):
        expr = F.when(F.col("source") == source, F.lit(float(factor))).otherwise(expr)
    return expr


def category_factors(stats: dict[str, tuple[float, float]], targets: dict[str, float]) -> dict[str, float]:
    """Factor per category from ``{category: (tokens, weighted tokens)}`` so shares hit ``targets``."""
    total = sum(w for _, w in stats.values())
    named = {c: t for c, t in targets.items() if c in stats and stats[c][1] > 0}
    unnamed = sum(w for c, (_, w) in stats.items() if c not in named)
    share = sum(named.values())
    scale = unnamed / (1.0 - share) if unnamed > 0 and share < 1.0 else total
    return {c: (named[c] * scale / stats[c][1] if c in named else 1.0) for c in stats}


def bucket_name(weight: float, edges: list[float]) -> str:
    return f"b{sum(1 for edge in sorted(edges) if weight >= edge)}"


def _bucket_column(edges: list[float]) -> Column:
    index: Column = F.lit(0)
    for edge in sorted(edges):
        index = index + F.when(F.col("weight") >= F.lit(edge), 1).otherwise(0)
    return F.concat(F.lit("b"), index.cast("string"))


def run(df: DataFrame, ctx: StageContext) -> StageResult:
    cfg, near, emb = ctx.cfg.weight, ctx.cfg.near_dedup, ctx.cfg.embedding
    quality = F.coalesce(F.col("quality_score"), F.lit(1.0)) if "quality_score" in df.columns else F.lit(1.0)
    size = F.col("near_dup_size") if "near_dup_size" in df.columns else F.lit(1)
    density = F.col("emb_density") if "emb_density" in df.columns else F.lit(1.0)
    raw = (
        F.pow(F.greatest(quality, F.lit(1e-6)), cfg.quality_exponent)
        * F.pow(size.cast("double"), near.dup_weight_exponent)
        * F.pow(density, -emb.density_exponent)
        * _upsample(ctx.cfg.safety.upsample_sources)
    )
    scored = df.withColumn("weight", F.least(F.greatest(raw, F.lit(cfg.min_weight)), F.lit(cfg.max_weight)))
    # The weighted sum in exact decimal arithmetic: the same total whatever order the rows come in.
    rows = scored.groupBy("category").agg(
        F.sum("ntok").alias("tokens"), F.sum((F.col("weight") * F.col("ntok")).cast(EXACT)).alias("weighted")
    ).collect()
    # in category order: the float sums below must not follow the order the groups arrive in
    rows = sorted(rows, key=lambda r: (r["category"] is None, r["category"] or ""))
    stats = {r["category"]: (float(r["tokens"] or 0), float(r["weighted"] or 0)) for r in rows}
    factors = category_factors(stats, ctx.cfg.category.targets)
    tokens = sum(t for t, _ in stats.values())
    weighted = sum(factors[c] * w for c, (_, w) in stats.items())
    norm = tokens / weighted if weighted > 0 else 1.0
    factor: Column = F.lit(1.0)
    for category, value in sorted(factors.items()):
        factor = F.when(F.col("category") == category, F.lit(value * norm)).otherwise(factor)
    out = scored.withColumn("weight", F.col("weight") * factor).withColumn("bucket", _bucket_column(cfg.bucket_edges))
    shares = {c: round(factors[c] * w * norm / tokens, 6) if tokens else 0.0 for c, (_, w) in stats.items()}
    return StageResult(out, None, {"category_token_share": shares, "category_factor": {
        c: round(f * norm, 6) for c, f in factors.items() if math.isfinite(f)}})
