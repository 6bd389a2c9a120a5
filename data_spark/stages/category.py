"""Stage 8: category from a configurable taxonomy (first matching rule), evaluated natively."""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

from haina.data_spark.config import CategoryConfig
from haina.data_spark.stages.base import StageContext, StageResult


def category_column(cfg: CategoryConfig) -> Column:
    expr: Column = F.lit(cfg.default)
    for rule in reversed(cfg.rules):
        conditions = []
        if rule.sources:
            conditions.append(F.col("source").isin(rule.sources))
        if rule.kinds:
            conditions.append(F.col("kind").isin(list(rule.kinds)))
        for keyword in rule.keywords:
            conditions.append(F.lower("text").contains(keyword.lower()))
        if conditions:
            match = conditions[0]
            for condition in conditions[1:]:
                match = match | condition
            expr = F.when(match, F.lit(rule.name)).otherwise(expr)
    return expr


def run(df, ctx: StageContext) -> StageResult:
    return StageResult(df.withColumn("category", category_column(ctx.cfg.category)))
