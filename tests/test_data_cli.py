"""The README's data commands as a user runs them: `haina data prepare` and `haina data tokenize --prepared`
through the CLI with `--master local[1]`, and `launchers/spark_submit.sh` in its local form.

Two Spark jobs in all, side by side: one fresh interpreter calls the CLI's ``run`` in-process (prepare, then
tokenize of its output), so `--master` picks the session instead of meeting the test process's own; and
spark-submit runs the same prepare (the session fixture ``cli_runs`` of tests.data_helpers; test_data_pipeline
compares its own in-process run with them). Every test below reads their outputs."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.data_helpers import BAD_LINES, known_corpus
from tests.test_data_pipeline import _check_blend_against_kept

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


def _without_timings(report: dict) -> dict:
    """report.json minus what differs between two identical runs: seconds, the output path, a later tokenize."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("seconds", "output")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip({k: v for k, v in report.items() if k != "tokenized"})


def _kept_ids() -> set[str]:
    return {r["id"] for r in known_corpus() if r["expect"] == "kept"}


def test_prepare_through_the_cli(cli_runs: dict) -> None:
    result, out = cli_runs["cli"]["prepare"], cli_runs["root"] / "cli"
    assert result["rc"] == 0, result["stdout"][-2000:]
    summary = [ln for ln in result["stdout"].splitlines() if ln.startswith("kept ")]
    assert len(summary) == 1, result["stdout"][-2000:]
    match = re.fullmatch(r"kept ([\d,]+) documents \((\d+\.\d)% of raw tokens\); report (\S+)", summary[0])
    assert match, summary
    report = json.loads((out / "report.json").read_text())
    assert int(match[1].replace(",", "")) == report["kept"]["documents"] == len(_kept_ids())
    assert abs(float(match[2]) - 100 * report["kept"]["share_of_raw_tokens"]) <= 0.05 + 1e-9
    assert Path(match[3]) == out / "report.json"
    assert report["ingest"]["documents"] == len(known_corpus()) and report["ingest"]["quarantined"] == len(BAD_LINES)
    kept = pq.read_table(out / "kept", columns=["doc_id", "text"]).to_pylist()
    assert {r["doc_id"] for r in kept} == _kept_ids()


def test_master_option_is_used(cli_runs: dict) -> None:
    """`--master local[1]` is accepted by both commands and is the session they ran in."""
    assert cli_runs["cli"]["prepare"]["rc"] == cli_runs["cli"]["tokenize"]["rc"] == 0
    assert cli_runs["cli"]["spark"] == {"master": "local[1]", "parallelism": 1}


def test_tokenize_prepared_through_the_cli(cli_runs: dict) -> None:
    from haina.core.config import load_config
    from haina.core.data import check_data_files, resolve_blend
    from haina.core.indexed_dataset import check_indexed_dataset

    result, out = cli_runs["cli"]["tokenize"], cli_runs["root"] / "cli"
    assert result["rc"] == 0, result["stdout"][-2000:]
    match = re.fullmatch(r"([\d,]+) tokens in (\d+) parts; blend (\S+)", result["stdout"].strip().splitlines()[-1])
    assert match, result["stdout"][-2000:]
    assert Path(match[3]) == out / "blend.json"
    blend = json.loads((out / "blend.json").read_text())
    entries = blend["datasets"]
    assert int(match[2]) == len(entries) >= 3
    for entry in entries:
        assert (out / f"{entry['prefix']}.bin").is_file() and (out / f"{entry['prefix']}.idx").is_file()
        check_indexed_dataset(out / entry["prefix"], "data.blend")
    # weights and shard contents recomputed from the kept documents (token counts from SentencePiece itself)
    _check_blend_against_kept(out, cli_runs["model"], entries)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(cli_runs["model"]))
    texts = pq.read_table(out / "kept", columns=["text"]).column("text").to_pylist()
    assert int(match[1].replace(",", "")) == sum(len(sp.encode(t)) + 1 for t in texts)
    report = json.loads((out / "report.json").read_text())
    assert report["tokenized"]["tokens"] == int(match[1].replace(",", ""))
    assert report["tokenized"]["parts"] == len(entries)
    # what `haina pretrain ... data.blend=PREPARED/blend.json` reads and checks before it starts
    cfg = load_config("tiny", [f"data.blend={json.dumps(str(out / 'blend.json'))}"])
    check_data_files(cfg.data)
    prefixes, weights = resolve_blend(cfg.data)
    assert prefixes == [str(out / e["prefix"]) for e in entries]
    assert weights == [e["weight"] for e in entries] and sum(weights) == pytest.approx(1.0)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no staging folder left"


def test_spark_submit_matches_the_in_process_run(cli_runs: dict) -> None:
    root = cli_runs["root"]
    assert cli_runs["submit_rc"] == 0, cli_runs["submit_log"][-4000:]
    assert re.search(r"^kept 7 documents \(", cli_runs["submit_log"], re.M), cli_runs["submit_log"][-2000:]
    cli = json.loads((root / "cli" / "report.json").read_text())
    submitted = json.loads((root / "submitted" / "report.json").read_text())
    assert _without_timings(submitted) == _without_timings(cli)
    assert [s["stage"] for s in submitted["stages"]] == [s["stage"] for s in cli["stages"]]

    def rows(out: Path, folder: str, columns: list[str]) -> list:
        table = ds.dataset(out / folder, format="parquet", partitioning="hive").to_table(columns=columns)
        return sorted(map(tuple, zip(*(table.column(c).to_pylist() for c in columns), strict=True)))

    kept_columns = ["row_id", "doc_id", "text", "category", "weight", "bucket", "quality_score", "safety_score"]
    assert rows(root / "submitted", "kept", kept_columns) == rows(root / "cli", "kept", kept_columns)
    assert rows(root / "submitted", "removed", ["doc_id", "stage"]) == rows(root / "cli", "removed", ["doc_id", "stage"])
    assert rows(root / "submitted", "quarantine", ["file", "reason"]) == rows(root / "cli", "quarantine", ["file", "reason"])


def _submitted_properties(root: Path) -> dict:
    """The Spark properties of the spark-submit application, from its event log."""
    (log,) = [p for p in (root / "events").rglob("*") if p.is_file() and not p.name.startswith(".")]
    properties: dict = {}
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("Event") == "SparkListenerEnvironmentUpdate":
            props = event["Spark Properties"]
            properties = dict(props) if isinstance(props, list) else props
    assert properties, log
    return properties


def test_spark_submit_ships_the_wheel(cli_runs: dict) -> None:
    """Without HAINA_ENV_ARCHIVE, haina goes with --py-files as a wheel built from this checkout (the launcher's
    documented way), and SPARK_ARGS reach spark-submit (the event log exists because of them)."""
    root = cli_runs["root"]
    assert cli_runs["submit_rc"] == 0, cli_runs["submit_log"][-4000:]
    properties = _submitted_properties(root)
    (wheel,) = (root / "tmp").glob("*/haina-*.whl")
    assert str(wheel) in properties.get("spark.submit.pyFiles", ""), properties.get("spark.submit.pyFiles")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"haina/tools/cli.py", "haina/data_spark/pipeline.py", "haina/data_spark/stages/near_dedup.py"} <= names
    assert properties.get("spark.app.name") == "haina-data-prepare"


def test_spark_submit_uses_its_master(cli_runs: dict) -> None:
    """SPARK_MASTER=local[1] is the master the launcher's application ran with (its event log says so), with
    Spark's adaptive query execution, which the CLI run it is compared with has off (``QUICK_SPARK``)."""
    assert cli_runs["submit_rc"] == 0, cli_runs["submit_log"][-4000:]
    properties = _submitted_properties(cli_runs["root"])
    assert properties.get("spark.master") == "local[1]"
    assert properties.get("spark.sql.adaptive.enabled", "true") == "true"
