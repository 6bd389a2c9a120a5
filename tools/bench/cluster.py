"""The data job on a real Spark cluster, and connected components at scale:

    python -m haina.tools.bench.cluster [--docs 400] [--nodes 1000000] [--skip-cluster] [--skip-components]

**Standalone cluster.** A Spark master and two workers (one core, 1 GiB each) are started on this machine
from the pyspark installation (``spark-class org.apache.spark.deploy.master.Master`` / ``...worker.Worker``),
and ``haina data prepare`` runs on them through ``launchers/spark_submit.sh`` exactly as the README says
(``SPARK_MASTER=spark://...``; haina shipped as a wheel with ``--py-files``, the executors' Python given by
``spark.pyspark.python``). The same input also goes through ``haina data prepare --master local[2]``. The
corpus is real text (:func:`haina.tools.bench.dedup.make_corpus`: installed documentation with planted
near-duplicates) plus a few hand-made bad records. Printed: whether the kept rows, the removals, the
quarantine and ``report.json`` (timings aside) are identical, how many executors ran tasks, and seconds.

**Connected components** (the near-dedup stage's :func:`haina.data_spark.connected_components`): a chain
of ``--nodes`` nodes (edges i - i+1, the worst case for label propagation) and a star of as many (one
centre), on local[2]. Printed: rounds against the round limit, seconds, and that every node got the
component's smallest id.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BAD_RECORDS = [b'{"id": "trunc", "text": "cut off', b"\xff\xfe not utf-8", b'{"id": 5, "text": 7}']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spark_class() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / "spark-class"


def _wait_for_workers(ui_port: int, n: int, timeout: float = 120.0) -> dict[str, Any]:
    """The master's JSON status once ``n`` workers are alive (its web UI serves /json/)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as response:
                last = json.loads(response.read())
            if last.get("aliveworkers", 0) >= n:
                return last
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the standalone master has {last.get('aliveworkers', 0)} of {n} workers after {timeout:.0f} s")


class Cluster:
    """A standalone master and ``workers`` workers on 127.0.0.1, stopped on exit."""

    def __init__(self, folder: Path, workers: int = 2) -> None:
        self.folder, self.workers = folder, workers
        self.port, self.ui = _free_port(), _free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def __enter__(self) -> Cluster:
        env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(self.folder / "logs"))
        spark_class = str(_spark_class())
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)

        def start(name: str, args: list[str]) -> None:
            out = open(logs / f"{name}.log", "w")  # noqa: SIM115  (closed with the process)
            self.procs.append(subprocess.Popen([spark_class, *args], stdout=out, stderr=subprocess.STDOUT, env=env))

        start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port),
                         "--webui-port", str(self.ui)])
        for i in range(self.workers):
            work = self.folder / f"worker-{i}"
            work.mkdir(exist_ok=True)
            start(f"worker-{i}", ["org.apache.spark.deploy.worker.Worker", self.url, "--cores", "1", "--memory", "1g",
                                  "--work-dir", str(work), "--webui-port", str(_free_port())])
        _wait_for_workers(self.ui, self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def executors_used(self) -> int:
        """Executors of finished applications that ran on the workers (from their work folders)."""
        return sum(1 for i in range(self.workers) for app in (self.folder / f"worker-{i}").glob("app-*")
                   for _ in app.iterdir())


# ------------------------------------------------------------------------------------------- the job

def write_corpus(folder: Path, docs: int) -> list[Path]:
    from haina.data_spark.config import NearDedupConfig
    from haina.tools.bench.dedup import make_corpus

    corpus, _ = make_corpus(docs, 0, NearDedupConfig().shingle_size)
    half = len(corpus) // 2
    paths = []
    for i, part in enumerate((corpus[:half], corpus[half:])):
        path = folder / f"part-{i}.jsonl"
        with path.open("wb") as f:
            for doc in part:
                f.write(json.dumps({"id": str(doc["id"]), "text": doc["text"]}, ensure_ascii=False).encode() + b"\n")
            if i == 1:
                f.write(b"\n".join(BAD_RECORDS) + b"\n")
        paths.append(path)
    return paths


def _rows(out: Path, folder: str, columns: list[str]) -> list[tuple]:
    import pyarrow.dataset as ds

    table = ds.dataset(out / folder, format="parquet", partitioning="hive").to_table(columns=columns)
    return sorted(map(tuple, zip(*(table.column(c).to_pylist() for c in columns), strict=True)))


def _report(out: Path) -> Any:
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("seconds", "output")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads((out / "report.json").read_text()))


def compare(local: Path, cluster: Path) -> dict[str, bool]:
    kept = ["row_id", "doc_id", "text", "category", "weight", "bucket", "quality_score", "safety_score", "emb_cluster"]
    return {
        "kept": _rows(local, "kept", kept) == _rows(cluster, "kept", kept),
        "removed": _rows(local, "removed", ["doc_id", "stage"]) == _rows(cluster, "removed", ["doc_id", "stage"]),
        "quarantine": _rows(local, "quarantine", ["file", "reason"]) == _rows(cluster, "quarantine", ["file", "reason"]),
        "report": _report(local) == _report(cluster),
    }


def run_cluster(docs: int, folder: Path) -> dict[str, Any]:
    inputs = [str(p) for p in write_corpus(folder, docs)]
    overrides = ["spark.shuffle_partitions=4"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    local = subprocess.run(
        [sys.executable, "-m", "haina.tools.cli", "data", "prepare", "--input", *inputs, "--output",
         str(folder / "local"), "--master", "local[2]", *overrides],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    local_s = time.perf_counter() - start
    if local.returncode != 0:
        raise RuntimeError(f"local run failed: {local.stderr.strip().splitlines()[-3:]}")
    with Cluster(folder / "cluster") as cluster:
        start = time.perf_counter()
        submitted = subprocess.run(
            [str(ROOT / "launchers" / "spark_submit.sh"), "prepare", "--input", *inputs, "--output",
             str(folder / "on-cluster"), *overrides],
            capture_output=True, text=True, timeout=3600,
            env=dict(env, SPARK_MASTER=cluster.url, TMPDIR=str(folder),
                     SPARK_ARGS=f"--conf spark.pyspark.python={sys.executable} --conf spark.executor.memory=900m"),
        )
        cluster_s = time.perf_counter() - start
        executors = cluster.executors_used()
    if submitted.returncode != 0:
        raise RuntimeError(f"cluster run failed: {submitted.stderr.strip().splitlines()[-5:]}")
    report = json.loads((folder / "on-cluster" / "report.json").read_text())
    return {"documents": report["ingest"]["documents"], "quarantined": report["ingest"]["quarantined"],
            "kept": report["kept"]["documents"], "identical": compare(folder / "local", folder / "on-cluster"),
            "executors": executors, "local_seconds": local_s, "cluster_seconds": cluster_s}


# ---------------------------------------------------------------------------------- connected components

def run_components(nodes: int) -> list[dict[str, Any]]:
    from pyspark.sql import functions as F

    from haina.data_spark.config import NearDedupConfig, SparkConfig
    from haina.data_spark.connected_components import connected_components
    from haina.data_spark.session import get_session

    spark = get_session(SparkConfig(shuffle_partitions=8, conf={"spark.ui.enabled": "false"}), "local[2]")
    limit = NearDedupConfig().max_iterations
    shapes = {
        "chain": spark.range(nodes - 1).select(F.col("id").alias("src"), (F.col("id") + 1).alias("dst")),
        "star": spark.range(1, nodes).select(F.lit(0).cast("long").alias("src"), F.col("id").alias("dst")),
    }
    rows = []
    for name, edges in shapes.items():
        stats: dict[str, Any] = {}
        start = time.perf_counter()
        labels = connected_components(edges, limit, stats=stats)
        summary = labels.agg(F.count("*").alias("n"), F.max("component").alias("top")).first()
        rows.append({"shape": name, "nodes": nodes, "rounds": stats["rounds"], "limit": limit,
                     "seconds": time.perf_counter() - start,
                     "one_component": summary["n"] == nodes and summary["top"] == 0})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400, help="base documents of the cluster run's corpus")
    parser.add_argument("--nodes", type=int, default=1_000_000, help="nodes of the chain and of the star")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--skip-components", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    if not args.skip_components:
        result["components"] = run_components(args.nodes)
        if not args.json:
            print(f"{'shape':6} {'nodes':>10} {'rounds':>7} {'limit':>6} {'seconds':>8}  one component")
            for r in result["components"]:
                print(f"{r['shape']:6} {r['nodes']:>10,} {r['rounds']:>7} {r['limit']:>6} {r['seconds']:>8.1f}  "
                      f"{r['one_component']}")
    if not args.skip_cluster:
        folder = Path(tempfile.mkdtemp(prefix="haina-cluster-"))
        try:
            result["cluster"] = run_cluster(args.docs, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if not args.json:
            c = result["cluster"]
            print(f"standalone master + 2 workers through launchers/spark_submit.sh: {c['documents']:,} documents "
                  f"({c['quarantined']} quarantined), {c['kept']:,} kept, {c['executors']} executors; "
                  f"{c['cluster_seconds']:.0f} s (local[2]: {c['local_seconds']:.0f} s)")
            print("identical to local[2]: " + ", ".join(f"{k} {v}" for k, v in c["identical"].items()))
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
