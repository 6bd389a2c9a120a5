"""Data job recovery: `haina data prepare` killed mid-stage, or at any step of its commit and clean-up,
started again, ends as an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from haina.core import faults
from haina.core.errors import HainaError
from haina.core.faults import ENV, InjectedFault
from haina.data_spark import pipeline
from haina.data_spark.config import load_prepare_config
from haina.data_spark.pipeline import FAULT_POINT, JOB_FILE, MARKER, run_pipeline
from tests.data_helpers import (
    BAD_LINES,
    OVERRIDES,  # the CLI run's settings
    known_corpus,
    spark,  # noqa: F401  (session fixture)
    write_jsonl,
)

pytestmark = pytest.mark.timeout(900)
KILL_AT = "near_dedup"  # the fifth of nine stages


def _snapshot(out: Path) -> dict:
    kept = sorted(tuple(sorted(r.items())) for r in pq.read_table(out / "kept").to_pylist())
    removed = ds.dataset(out / "removed", format="parquet", partitioning="hive").to_table().to_pylist()
    quarantine = pq.read_table(out / "quarantine").to_pylist()
    key = json.dumps
    return {"kept": kept, "removed": sorted(map(key, removed)), "quarantine": sorted(map(key, quarantine))}


@pytest.mark.integration
def test_killed_job_resumes_to_the_same_output(
    spark, cli_runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The kill is a BaseException raised after the stage's data is written and before its marker: no
    ``except Exception`` clean-up runs, so the disk is left exactly as a SIGKILL there leaves it (a
    subprocess and a second Spark JVM would cost a minute more on two cores). The uninterrupted run it must
    equal is the CLI's (``cli_runs``: the same input files and settings, run straight through in another
    process)."""
    inputs = [cli_runs["root"] / "a.jsonl", cli_runs["root"] / "b.jsonl"]
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
    straight = json.loads((cli_runs["root"] / "cli" / "report.json").read_text())
    assert "resumed_stages" not in straight and cli_runs["cli"]["prepare"]["rc"] == 0
    assert _snapshot(out) == _snapshot(cli_runs["root"] / "cli")
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


def _stage_folder(root: Path, name: str, parts: int = 2) -> Path:
    """A stage published the way the job publishes one (two part files, a removed folder beside)."""
    work = root / "stages" / f".{name}.partial"
    work.mkdir(parents=True)
    for i in range(parts):
        (work / f"part-{i:05d}.parquet").write_bytes(b"rows" * (i + 1))
    removed = root / "removed" / f"stage={name}"
    removed.mkdir(parents=True)
    (removed / "part-00000.parquet").write_bytes(b"removed rows")
    pipeline._publish(work, root / "stages" / name, {"stage": name, "row": {"docs_out": 2}}, root,
                      (f"removed/stage={name}",), ("models",))
    return root / "stages" / name


def test_a_stage_is_complete_only_with_every_file_it_wrote(tmp_path: Path) -> None:
    """The issue's case: the marker there, one of two part files gone; a resume must redo the stage."""
    folder = _stage_folder(tmp_path, "09_weighting")
    marker = pipeline._completed(folder, tmp_path)
    assert marker is not None and marker["row"] == {"docs_out": 2}
    assert sorted(marker["files"]) == ["removed/stage=09_weighting/part-00000.parquet",
                                       "stages/09_weighting/part-00000.parquet", "stages/09_weighting/part-00001.parquet"]
    part = folder / "part-00001.parquet"
    data = part.read_bytes()
    part.unlink()
    assert pipeline._completed(folder, tmp_path) is None  # a part file missing
    part.write_bytes(data[:3])
    assert pipeline._completed(folder, tmp_path) is None  # a part file truncated
    part.write_bytes(data)
    (tmp_path / "removed" / "stage=09_weighting" / "part-00001.parquet").write_bytes(b"x")
    assert pipeline._completed(folder, tmp_path) is None  # a part the stage did not write (Spark would read it)
    (tmp_path / "removed" / "stage=09_weighting" / "part-00001.parquet").unlink()
    assert pipeline._completed(folder, tmp_path) is not None
    (folder / MARKER).write_text(json.dumps({"stage": "09_weighting", "row": {}}))  # a marker of the old format
    assert pipeline._completed(folder, tmp_path) is None


def test_deleting_removes_the_fingerprint_and_markers_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the second delete of a temporary output, nothing left looks resumable."""
    (tmp_path / "out" / JOB_FILE).parent.mkdir()
    (tmp_path / "out" / JOB_FILE).write_text('{"fingerprint": "f"}')
    folder = _stage_folder(tmp_path / "out", "01_exact_dedup")
    monkeypatch.setenv(ENV, f"{FAULT_POINT}:crash@2")
    monkeypatch.setattr(pipeline._Ops, "count", 0)
    with pytest.raises(InjectedFault):
        pipeline._remove_tree(tmp_path / "out")
    assert not (tmp_path / "out" / JOB_FILE).exists() and not (folder / MARKER).exists()
    assert (folder / "part-00000.parquet").is_file()  # the data goes after
    assert pipeline._fingerprint_of(tmp_path / "out" / JOB_FILE) is None
    monkeypatch.delenv(ENV)
    pipeline._remove_tree(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Only ingest, category and weighting: three stage folders of two part files each, seconds per run.
FAST = [*OVERRIDES, *(f"{s}.enabled=false" for s in
                      ("exact_dedup", "heuristics", "quality", "line_dedup", "near_dedup", "embedding", "safety"))]


@pytest.mark.integration
def test_a_kill_at_any_step_of_the_commit_loses_nothing(
    spark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Stop the job after the commit's 1st, 2nd, ... delete or rename (report.json, the fingerprint, the
    move of stages/, the publishing rename, each file of the clean-up); the output, when it is there, and
    every rerun's output otherwise equal the uninterrupted run's. Each try starts from a copy of a
    temporary output whose stages are all complete, so it costs one resumed run (and a rerun)."""
    inputs = [write_jsonl(tmp_path / "a.jsonl", known_corpus(), BAD_LINES)]
    cfg = load_prepare_config(None, FAST)
    steps: list[int] = []
    fire = faults.fire

    def counting(point: str, at: int | str, rank: int = 0) -> None:
        if point == FAULT_POINT:
            steps.append(int(at))
        fire(point, at, rank)

    monkeypatch.setattr(faults, "fire", counting)
    straight = run_pipeline(spark, inputs, tmp_path / "straight", cfg, progress=False)
    expected = _snapshot(tmp_path / "straight")
    total = max(steps)
    assert total > 20  # report, fingerprint, stages moved, publish, then every file and folder of stages/

    def rows(report: dict) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in report["stages"]]

    monkeypatch.setenv(ENV, f"{FAULT_POINT}:crash@1")
    with pytest.raises(InjectedFault):
        run_pipeline(spark, inputs, tmp_path / "base", cfg, progress=False)
    ready = tmp_path / ".base.partial"
    assert all(pipeline._completed(p, ready) for p in (ready / "stages").iterdir() if not p.name.startswith("."))
    reran = []
    for n in range(1, total + 1):
        out = tmp_path / f"out{n}"
        shutil.copytree(ready, tmp_path / f".out{n}.partial", symlinks=True)
        monkeypatch.setenv(ENV, f"{FAULT_POINT}:crash@{n}")
        with pytest.raises(InjectedFault):
            run_pipeline(spark, inputs, out, cfg, progress=False)
        monkeypatch.delenv(ENV)
        if not out.exists():
            reran.append(n)
            run_pipeline(spark, inputs, out, cfg, progress=False)
            assert not (tmp_path / f".out{n}.partial").exists()
        report = json.loads((out / "report.json").read_text())
        assert _snapshot(out) == expected, n
        assert report["kept"] == straight["kept"] and rows(report) == rows(straight), n
        assert pq.read_table(out / "kept").num_rows == report["kept"]["documents"], n
        assert not (out / "stages").exists() and not (out / JOB_FILE).exists(), n
    assert 1 <= len(reran) < total  # killed before the publishing rename: rerun; after it: already complete
    trash = tmp_path / f".out{total - 1}.trash"
    assert trash.is_dir()  # killed before the trash's own folder went: left behind ...
    again = cfg.model_copy(update={"overwrite": True})
    run_pipeline(spark, inputs, tmp_path / f"out{total - 1}", again, progress=False)
    assert not trash.exists()  # ... until the next run on that output
