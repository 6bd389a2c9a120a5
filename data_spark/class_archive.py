"""A class-data-sharing archive of a local job's JVM: the classes Spark loads, mapped ready-made.

Before a local job's first task runs, its JVM loads, parses and verifies thousands of classes (Spark SQL,
Parquet, Arrow, Janino, Jetty), most of five seconds of one core while the other waits. Java's
application class-data sharing keeps them in an archive that a later JVM maps instead: the session starts
in 2.2 s instead of 5.2 and the first job runs in 1.8 s instead of 3.4.

An archive belongs to one Java build and one Spark installation (its jars, where they lie): its name
carries a digest of both, and Java checks the rest (its own build, the class path) and runs without it
when it does not fit. It is written once per installation by a small job on text that ships with Python
(:mod:`haina.data_spark.write_class_archive`, which ``make setup`` runs), and taken by every local session
that finds it (:func:`java_option`). A cluster's JVMs are started by their own launchers, and a session
whose options mention class sharing is left as it asks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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
    """Where this machine's archive for this Java and this Spark installation lives (None without a java)."""
    import pyspark

    java = _java()
    if java is None:
        return None
    jars = Path(pyspark.__file__).parent / "jars"
    digest = hashlib.sha256()
    # (Java also checks the class path against the one it archived, so each installation has its own)
    for part in (str(java), str(java.stat().st_size), str(java.stat().st_mtime_ns), pyspark.__version__, str(jars)):
        digest.update(part.encode() + b"\0")
    for jar in sorted(jars.glob("*.jar")):
        digest.update(f"{jar.name}:{jar.stat().st_size}".encode() + b"\0")
    return cache_dir() / f"spark-classes-{digest.hexdigest()[:16]}.jsa"


def existing() -> Path | None:
    """This installation's archive, if it has been written."""
    path = archive_path()
    return path if path is not None and path.is_file() else None


def java_option(given: str) -> str | None:
    """The options that map this installation's archive into a local JVM, or None: no archive yet, or the
    given JVM options (``given``) choose class sharing themselves."""
    if any(flag in given for flag in SHARING_FLAGS):
        return None
    path = existing()
    return f"-XX:SharedArchiveFile={path} {QUIET}" if path is not None else None
