"""Entry points of ``haina data prepare`` and ``haina data tokenize`` (and of the spark-submit script)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from haina.core.errors import ConfigError, InputFileError
from haina.core.files import fsync_tree, publish_dir, replace_durable, write_durable
from haina.data_spark.config import PrepareConfig, load_prepare_config


def prepare_main(
    inputs: list[Path],
    output: Path,
    config: Path | None = None,
    master: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole job; a :class:`HainaError` (ConfigError, InputFileError) in one line for bad user input."""
    # pyspark only once a job runs: config errors and kept_files() come without it
    from haina.data_spark.ingest import check_inputs
    from haina.data_spark.pipeline import fit_ahead, run_pipeline
    from haina.data_spark.session import get_session, input_bytes

    cfg = load_prepare_config(config, overrides)
    inputs = check_inputs([Path(p) for p in inputs])
    if cfg.tokenize.model is not None and not Path(cfg.tokenize.model).is_file():
        raise ConfigError(f"tokenize.model={cfg.tokenize.model}: tokenizer model not found")
    fit_ahead(cfg)
    spark = get_session(cfg.spark, master, input_bytes(inputs))
    return run_pipeline(spark, inputs, Path(output), cfg, progress=progress)


def kept_files(prepared: Path) -> list[Path]:
    """The Parquet part files of a prepared output's kept documents (for tokenizer training)."""
    files = sorted((Path(prepared) / "kept").glob("part-*.parquet"))
    if not files:
        raise InputFileError(f"{prepared}: no kept documents (is this a `haina data prepare` output?)")
    return files


def tokenize_main(
    prepared: Path,
    tokenizer_model: Path,
    config: Path | None = None,
    master: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Tokenize a prepared output's kept documents into ``tokenized/`` + ``blend.json`` (replacing old ones)."""
    # pyspark only once a job runs, as in prepare_main
    from haina.data_spark.session import get_session, input_bytes
    from haina.data_spark.tokenized_shards import blend_summary, write_shards

    prepared = Path(prepared).resolve()
    kept_files(prepared)
    cfg: PrepareConfig = load_prepare_config(config, overrides)
    if not Path(tokenizer_model).is_file():
        raise InputFileError(f"{tokenizer_model}: tokenizer model not found")
    spark = get_session(cfg.spark, master, input_bytes([prepared / "kept"]))
    staging = prepared / f".tokenize-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        blend = write_shards(spark, spark.read.parquet(str(prepared / "kept")), staging, Path(tokenizer_model),
                             partitions=cfg.tokenize.partitions, append_eos=cfg.tokenize.append_eos)
        fsync_tree(staging / "tokenized")  # parts written by the executors
        publish_dir(staging / "tokenized", prepared / "tokenized", manifest=False)
        replace_durable(staging / "blend.json", prepared / "blend.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"categories": blend_summary(blend), "parts": len(blend["datasets"]),
               "tokens": sum(d["tokens"] for d in blend["datasets"]), "blend": str(prepared / "blend.json")}
    report_path = prepared / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        report["tokenized"] = summary
        write_durable(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return summary
