"""The Spark session: embedded local mode by default, a cluster when --master or spark-submit says so."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from pyspark.sql import SparkSession

from haina.data_spark import class_archive
from haina.data_spark.config import SparkConfig

# A JVM spends a short job compiling. At 50,000 documents on two cores the optimising JIT (C2) took 40-50
# of the JVM's 100 CPU-seconds (most of it on code Spark generates per query, new in every stage), and its
# faster code won back about 10. A local job on at most SHORT_JOB_BYTES of input therefore stops at the
# quick compiler (C1); a longer one, where C2's compile time is repaid, and a cluster keep the full JIT.
QUICK_JIT = "-XX:TieredStopAtLevel=1"
SHORT_JOB_BYTES = 256 << 20
COMPRESSION = 4  # text per byte of a .gz input, about
ARROW_BATCH_ROWS = 1000


def input_bytes(paths: Iterable[Path]) -> int:
    """The size of some inputs (files, or folders of them), a gzipped file counted as the text it holds."""
    total = 0
    for path in map(Path, paths):
        for file in (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            total += file.stat().st_size * (COMPRESSION if file.name.endswith(".gz") else 1)
    return total


def java_options(chosen: str | None, conf: dict[str, str], size: int | None) -> dict[str, str]:
    """``spark.driver.extraJavaOptions`` for a local JVM: the given ones, with this machine's class archive
    (:mod:`haina.data_spark.class_archive`) when there is one, and :data:`QUICK_JIT` for a short job
    (``size``: its input in bytes, None when unknown) unless the given options choose a JIT tier themselves."""
    key = "spark.driver.extraJavaOptions"
    given = conf.get(key, "")
    options = [given] if given else []
    if (chosen or "").startswith("local"):
        options.append(class_archive.java_option(given) or "")
        if size is not None and size <= SHORT_JOB_BYTES and "Tiered" not in given:
            options.append(QUICK_JIT)
    joined = " ".join(o for o in options if o)
    return {key: joined} if joined else {}


def get_session(cfg: SparkConfig, master: str | None = None, size: int | None = None) -> SparkSession:
    """Create (or reuse) the session; spark-submit's own master wins over the config default. ``size``: the
    bytes of input the job reads, which picks the JIT of a local JVM (:func:`java_options`).

    spark-submit starts this driver with a gateway to its JVM (``PYSPARK_GATEWAY_PORT``); asking
    ``SparkConf()`` before any JVM is attached would see an empty conf and put ``local[*]`` in the place of
    the cluster's master, and its JVM's options are set already."""
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
        # Arrow batches of 1,000 rows rather than Spark's 10,000: the stages' Python works a batch at a time in
        # numpy (every code point of the batch, every token, every n-gram id), and the arrays of 10,000
        # documents, tens of MB each, were freshly mapped and faulted in for every batch. Featurising for the
        # embedding and the quality scores took 30-45% less Python time per document in batches of 1,000 to
        # 2,000, in one process alternating the sizes; the results do not depend on the batching.
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(ARROW_BATCH_ROWS),
        # Files are read in splits of at most 16 MiB (Spark's default is 128 MiB, or a core's share of the
        # input if less): a stage's eight part files become about eight tasks rather than two or three
        # uneven ones, so the Python of a row-wise stage keeps both cores busy to the end. Opening a file
        # costs as much as a split, so no two files share a task and the split size no longer follows the
        # core count.
        "spark.sql.files.maxPartitionBytes": "16m",
        "spark.sql.files.openCostInBytes": "16m",
        # A stage's cached tables (its judged rows, between the writes of kept/ and removed/) live a few
        # seconds: compressing them meant trying a dictionary and a run-length encoding on every column,
        # texts and ids that are nearly all distinct, for about a tenth of the JVM's time in a stage.
        "spark.sql.inMemoryColumnarStorage.compressed": "false",
        **cfg.conf,
        **java_options(None if submitted else chosen, cfg.conf, size),
    }
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
