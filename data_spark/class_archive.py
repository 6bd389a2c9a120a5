"""A class-data-sharing archive of a local job's JVM: the classes Spark loads, mapped ready-made.

Before a local job's first task runs, its JVM loads, parses and verifies thousands of classes (Spark SQL,
Parquet, Arrow, Janino, Jetty), most of five seconds of one core while the other waits. Java's
application class-data sharing keeps them in an archive that a later JVM maps instead: the session starts
in 2.2 s instead of 5.2 and the first job runs in 1.8 s instead of 3.4.

An archive belongs to one Java build and one Spark installation: its name carries a digest of both, and
Java checks the rest (its own build, the class path) and runs without it when it does not fit. It is
written once per machine (``make setup`` runs :func:`main`), by a small job on text that ships with
Python, and taken by every local session that finds it (:func:`java_option`). A cluster's JVMs are
started by their own launchers, and a session whose options mention class sharing is left as it asks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHARING_FLAGS = ("Xshare", "SharedArchiveFile", "ArchiveClassesAtExit")
QUIET = "-Xlog:cds=off,cds+dynamic=off"  # (Java reports every class it cannot archive, and a misfit)


def _java() -> Path | None:
    """The java that Spark's launcher runs: ``$JAVA_HOME/bin/java``, else the first on the path."""
    home = os.environ.get("JAVA_HOME")
    found = Path(home) / "bin" / "java" if home else (Path(w) if (w := shutil.which("java")) else None)
    return found.resolve() if found is not None and found.is_file() else None


def cache_dir() -> Path:
    """``$HAINA_CACHE_DIR``, else ``$XDG_CACHE_HOME/haina``, else ``~/.cache/haina``."""
    if os.environ.get("HAINA_CACHE_DIR"):
        return Path(os.environ["HAINA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "haina"


def archive_path() -> Path | None:
    """Where this machine's archive for this Java and this Spark lives (None without a java)."""
    import pyspark

    java = _java()
    if java is None:
        return None
    jars = Path(pyspark.__file__).parent / "jars"
    digest = hashlib.sha256()
    for part in (str(java), str(java.stat().st_size), str(java.stat().st_mtime_ns), pyspark.__version__):
        digest.update(part.encode() + b"\0")
    for jar in sorted(jars.glob("*.jar")):
        digest.update(f"{jar.name}:{jar.stat().st_size}".encode() + b"\0")
    return cache_dir() / f"spark-classes-{digest.hexdigest()[:16]}.jsa"


def java_option(given: str) -> str | None:
    """The options that map this machine's archive into a local JVM, or None: no archive yet, or the given
    JVM options (``given``) choose class sharing themselves."""
    if any(flag in given for flag in SHARING_FLAGS):
        return None
    path = archive_path()
    return f"-XX:SharedArchiveFile={path} {QUIET}" if path is not None and path.is_file() else None


def _sample(folder: Path) -> Path:
    """A few hundred documents of installed text (English prose, code, a copy, a near copy, a short one), so
    the job runs every stage and its JVM loads what a real job's does."""
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
