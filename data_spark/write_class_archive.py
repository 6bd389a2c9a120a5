"""Writes this installation's class archive (:mod:`haina.data_spark.class_archive` says what it is for):
``python -m haina.data_spark.write_class_archive``, which ``make setup`` runs. It is apart from the reader
because it runs a job through the session, which imports the reader."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from haina.data_spark.class_archive import QUIET, archive_path


def _sample(folder: Path) -> Path:
    """About 270 documents of installed text (Python's reference topics and docstrings, exact and near copies
    of some, one too short), so that the job runs every stage and its JVM loads what a real job's does."""
    import json

    from haina.data_spark.installed_text import reference_topics, stdlib_docstrings

    docs = ["\n\n".join(paragraphs) for source in (reference_topics(), stdlib_docstrings())
            for paragraphs, _ in zip(source, range(150), strict=False)]
    docs += docs[:20] + [doc.replace(" the ", " a ", 3) for doc in docs[20:40]] + ["too short"]
    path = folder / "sample.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": str(i)}) + "\n" for i, doc in enumerate(docs)),
                    encoding="utf-8")
    return path


def _end_jvm() -> int | None:
    """Stop the session and its JVM and wait for the JVM to exit (it ends when its stdin does): its exit
    code, None when no JVM was started."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is None:
        return None
    if SparkContext._active_spark_context is not None:
        SparkContext._active_spark_context.stop()
    gateway.shutdown()
    gateway.proc.stdin.close()
    return gateway.proc.wait(timeout=600)


def build(target: Path) -> Path:
    """Run the sample job in a JVM that writes its classes beside ``target`` as it exits, and move the
    archive into place once the JVM has exited cleanly, so that no reader maps half of one; nothing is left
    behind when the job or the JVM fails. Must run in a process with no Spark session yet: it starts and
    ends its own JVM."""
    from pyspark import SparkContext

    from haina.data_spark.config import load_prepare_config
    from haina.data_spark.pipeline import run_pipeline
    from haina.data_spark.session import get_session

    if SparkContext._gateway is not None:
        raise RuntimeError("a JVM runs in this process already; its classes cannot be archived")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    ran = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sample = _sample(Path(tmp))
            options = f"-XX:ArchiveClassesAtExit={partial} {QUIET}"
            cfg = load_prepare_config(None, [f'spark.conf={{"spark.driver.extraJavaOptions": "{options}"}}'])
            spark = get_session(cfg.spark, "local[2]", sample.stat().st_size)
            run_pipeline(spark, [sample], Path(tmp) / "out", cfg, progress=False)
            ran = True
    finally:
        code = _end_jvm()
        if not ran or code != 0 or not partial.is_file() or not partial.stat().st_size:
            partial.unlink(missing_ok=True)
    if not partial.is_file():
        raise RuntimeError(f"the JVM exited with {code} without writing its class archive")
    os.replace(partial, target)
    return target


def main() -> int:
    """Write this machine's archive unless it exists; a failure is reported in one line and jobs run
    without one (exit 0: a missing archive costs seconds, not results)."""
    path = archive_path()
    if path is None:
        print("class archive: no java found; Spark jobs will say why", file=sys.stderr)
        return 0
    if path.is_file():
        print(f"class archive: {path} (exists)")
        return 0
    start = time.perf_counter()
    try:
        build(path)
    except Exception as exc:  # noqa: BLE001 - reported, and nothing depends on the archive
        print(f"class archive: not written ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
              file=sys.stderr)
        return 0
    print(f"class archive: {path} ({path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
