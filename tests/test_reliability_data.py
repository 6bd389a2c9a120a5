"""Data job recovery: `haina data prepare` killed mid-stage, started again, ends as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from haina.core.errors import HainaError
from haina.core.faults import ENV, InjectedFault
from haina.data_spark.config import load_prepare_config
from haina.data_spark.pipeline import MARKER, run_pipeline
from tests.data_helpers import (
    BAD_LINES,
    TEST_OVERRIDES,
    known_corpus,
    spark,  # noqa: F401  (session fixture)
    write_jsonl,
)

pytestmark = pytest.mark.timeout(900)
OVERRIDES = [*TEST_OVERRIDES, "spark.shuffle_partitions=2", "safety.blocklist=['[unsafe-demo]']"]
KILL_AT = "near_dedup"  # the fifth of nine stages


def _snapshot(out: Path) -> dict:
    kept = sorted(tuple(sorted(r.items())) for r in pq.read_table(out / "kept").to_pylist())
    removed = ds.dataset(out / "removed", format="parquet", partitioning="hive").to_table().to_pylist()
    quarantine = pq.read_table(out / "quarantine").to_pylist()
    key = json.dumps
    return {"kept": kept, "removed": sorted(map(key, removed)), "quarantine": sorted(map(key, quarantine))}


@pytest.mark.integration
def test_killed_job_resumes_to_the_same_output(
    spark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The kill is a BaseException raised after the stage's data is written and before its marker: no
    ``except Exception`` clean-up runs, so the disk is left exactly as a SIGKILL there leaves it (a
    subprocess and a second Spark JVM would cost a minute more on two cores)."""
    inputs = [write_jsonl(tmp_path / "a.jsonl", known_corpus()[:6]),
              write_jsonl(tmp_path / "b.jsonl", known_corpus()[6:], BAD_LINES)]
    out = tmp_path / "out"
    cfg = load_prepare_config(None, OVERRIDES)
    monkeypatch.setenv(ENV, f"data_stage:crash@{KILL_AT}")
    with pytest.raises(InjectedFault):
        run_pipeline(spark, inputs, out, cfg, progress=False)
    monkeypatch.delenv(ENV)
    partial = tmp_path / ".out.partial"
    assert not out.exists() and (partial / "stages" / "04_line_dedup" / MARKER).is_file()
    assert not (partial / "stages" / f"05_{KILL_AT}").exists()  # written to its work folder only
    assert (partial / "stages" / f".05_{KILL_AT}.partial").is_dir()

    resumed = run_pipeline(spark, inputs, out, cfg, progress=False)
    assert resumed["resumed_stages"] == ["ingest", "exact_dedup", "heuristics", "quality", "line_dedup"]
    assert not partial.exists()
    straight = run_pipeline(spark, inputs, tmp_path / "straight", cfg, progress=False)
    assert "resumed_stages" not in straight
    assert _snapshot(out) == _snapshot(tmp_path / "straight")
    strip = ("seconds", "model")
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed["stages"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in straight["stages"]
    ]


def test_changed_config_does_not_reuse_stale_stages(tmp_path: Path) -> None:
    """A leftover temporary output with another fingerprint is discarded, not resumed."""
    from haina.data_spark.pipeline import JOB_FILE, _lock, _prepare_output, job_fingerprint

    data = write_jsonl(tmp_path / "a.jsonl", known_corpus()[:3])
    one = job_fingerprint([data], load_prepare_config(None, OVERRIDES))
    two = job_fingerprint([data], load_prepare_config(None, [*OVERRIDES, "heuristics.en.min_words=5"]))
    assert one != two
    assert one == job_fingerprint([data], load_prepare_config(None, [*OVERRIDES, "keep_intermediate=true"]))
    tmp = _prepare_output(tmp_path / "out", False, one)
    (tmp / "stages" / "00_ingest").mkdir(parents=True)
    assert _prepare_output(tmp_path / "out", False, one) == tmp and (tmp / "stages").is_dir()
    assert _prepare_output(tmp_path / "out", False, two) == tmp and not (tmp / "stages").exists()
    assert json.loads((tmp / JOB_FILE).read_text())["fingerprint"] == two
    held = _lock(tmp_path / "out")
    with pytest.raises(HainaError, match="another `haina data prepare` is writing"):
        _lock(tmp_path / "out")
    held.close()
    _lock(tmp_path / "out").close()
