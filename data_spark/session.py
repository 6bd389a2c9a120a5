"""The Spark session: embedded local mode by default, a cluster when --master or spark-submit says so."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from haina.data_spark.config import SparkConfig


def get_session(cfg: SparkConfig, master: str | None = None) -> SparkSession:
    """Create (or reuse) the session; spark-submit's own master wins over the config default.

    spark-submit starts this driver with a gateway to its JVM (``PYSPARK_GATEWAY_PORT``); asking
    ``SparkConf()`` before any JVM is attached would see an empty conf and put ``local[*]`` in the place of
    the cluster's master."""
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    chosen = master or (None if submitted else cfg.master)
    if chosen and chosen.startswith("local"):
        # Local workers must run this interpreter (with pyarrow, numpy, haina), not whatever python3 is first.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.app_name)
    if chosen:
        builder = builder.master(chosen)
    settings = {
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.driver.memory": cfg.driver_memory,
        "spark.ui.showConsoleProgress": "false",  # rich reports per-stage progress instead
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Files are read in splits of at most 16 MiB (Spark's default is 128 MiB, or a core's share of the
        # input if less): a stage's eight part files become about eight tasks rather than two or three
        # uneven ones, so the Python of a row-wise stage keeps both cores busy to the end. Opening a file
        # costs as much as a split, so no two files share a task and the split size no longer follows the
        # core count.
        "spark.sql.files.maxPartitionBytes": "16m",
        "spark.sql.files.openCostInBytes": "16m",
        **cfg.conf,
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
