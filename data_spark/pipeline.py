"""The job runner: stages in the report's order (or ``stage_order``), each materialised to Parquet,
committed by one rename.

Ingest also takes what exact and near dedup decide on from each document as it came in
(:mod:`haina.data_spark.ingest_keys`): the exact-dedup key travels as a column through the stages in
between and, like every column whose name starts with ``_``, is dropped before ``kept/`` is written; the
near-dedup columns, as large as the text, stay in ingest's folder until near-dedup reads them.

Every stage reads the previous stage's Parquet and writes its own under a temporary folder beside the
output (``.NAME.partial``), so lineage stays short, a stage's Python runs once, and the final publish
(:func:`haina.core.files.publish_dir`: fsync, rename, fsync of the parent) makes the output appear complete
or not at all.

Recovery: each stage writes into a hidden work folder, adds a completion marker holding its report row
and the size of every file the stage wrote (its folder, its ``removed/stage=NAME``, the models), and
publishes the folder into place the same way; the temporary output records a fingerprint of the inputs
(path, size, mtime) and the config. A job that was killed (SIGKILL, SIGTERM, Ctrl-C) and started again
with the same inputs and config reuses the stages whose files are all there, up to the first that is not,
and redoes the rest; a changed fingerprint starts afresh.

Deleting never leaves a half that looks resumable: :func:`_remove_tree` removes the fingerprint and the
markers first, and the commit (:func:`_commit`) takes the fingerprint away, moves ``stages/`` out in one
rename, publishes, and only then deletes. Every delete and rename of the commit and clean-up is numbered,
and ``HAINA_FAULTS=data_commit:crash@N`` stops the job right after the N-th (the recovery tests do, at each).
An exception in a stage (a bug, bad data) still removes the temporary output; too many quarantined
records (``input.max_quarantine_share``) keep it, so a rerun with a higher share resumes after ingest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from haina.core import faults
from haina.core.errors import HainaError
from haina.core.files import fsync_dir, fsync_tree, publish_dir, write_durable
from haina.data_spark.config import PrepareConfig, dump_prepare_config
from haina.data_spark.ingest import (
    TooManyBadRecords,
    check_inputs,
    check_quarantine_share,
    documents,
    quarantine_summary,
    quarantined,
    read_inputs,
)
from haina.data_spark.ingest_keys import NEAR_COLUMNS, key_fields
from haina.data_spark.stages import (
    category,
    embedding,
    exact_dedup,
    heuristics,
    line_dedup,
    near_dedup,
    quality,
    safety,
    weighting,
)
from haina.data_spark.stages.base import StageContext, StageResult
from haina.data_spark.tokenized_shards import blend_summary, write_shards

StageFn = Callable[[DataFrame, StageContext], StageResult]

# (name, run, config section with ``enabled`` or None when the stage always runs), in the report's order;
# ``stage_order`` in the config may reorder them (:func:`ordered_stages`).
STAGES: list[tuple[str, StageFn, str | None]] = [
    ("exact_dedup", exact_dedup.run, "exact_dedup"),
    ("heuristics", heuristics.run, "heuristics"),
    ("quality", quality.run, "quality"),
    ("line_dedup", line_dedup.run, "line_dedup"),
    ("near_dedup", near_dedup.run, "near_dedup"),
    ("embedding", embedding.run, "embedding"),
    ("safety", safety.run, "safety"),
    ("category", category.run, None),
    ("weighting", weighting.run, None),
]


def ordered_stages(order: list[str]) -> list[tuple[str, StageFn, str | None]]:
    """``STAGES`` in the configured order (a stage the order does not name keeps its place after them)."""
    by_name = {stage[0]: stage for stage in STAGES}
    return [by_name[name] for name in order if name in by_name] + [s for s in STAGES if s[0] not in order]


class Progress:
    """One spinner per stage and one summary line when it ends, on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, quiet=not enabled)
        self.enabled = enabled

    def stage(self, name: str):
        return self.console.status(f"[bold]{name}[/]…") if self.enabled else nullcontext()

    def done(self, name: str, row: dict[str, Any]) -> None:
        if row.get("skipped"):
            self.console.print(f"[dim]- {name}: skipped[/]")
            return
        self.console.print(
            f"[green]✓[/] {name:<12} {row['docs_in']:>8,} → {row['docs_out']:>8,} docs  "
            f"{row['tokens_in']:>11,} → {row['tokens_out']:>11,} tokens  {row['seconds']:.1f}s"
        )
        for line in cut_lines(row):
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def cut_lines(row: dict[str, Any], examples: int = 3) -> list[str]:
    """The quality stage's cut in a few lines: threshold, what it removed, and the lowest-scoring and
    just-below-the-cut removed sentences with their scores (all of them are in report.json)."""
    cut, sample = row.get("cut"), row.get("removed_sample")
    if not isinstance(cut, dict) or not isinstance(sample, dict):
        return []
    how = (f"target_removal_share {cut['target_removal_share']:.1%}" if cut.get("rule") == "target_removal_share"
           else "sentence_threshold")
    lines = [f"  cut at score {cut['threshold']:.4f} ({how}): removed {cut['removed_sentences']:,} of "
             f"{cut['judged_sentences']:,} judged sentences, {cut['removed_char_share']:.1%} of their characters"]
    shown = set()
    for title, key in (("lowest", "lowest"), ("just below the cut", "just_below_cut")):
        for item in sample.get(key, [])[:examples]:
            if (item["row_id"], item["text"], item["score"]) in shown:
                continue  # few removed: the two lists meet
            shown.add((item["row_id"], item["text"], item["score"]))
            text = item["text"] if len(item["text"]) <= 70 else item["text"][:69] + "…"
            lines.append(f"    {title:<18} {item['score']:.4f}  {text}")
    return lines


def _counts(folder: Path, where: pc.Expression | None = None) -> tuple[int, int]:
    """(documents, sum of ``ntok``) of a folder of Parquet that this job just wrote (the rows ``where``
    holds, if given), read on the driver (the one ``ntok`` column batch by batch, so the driver holds one
    batch at a time): no Spark job, which on a small corpus costs more than the reading. pyarrow skips the
    names Spark does (``_SUCCESS``, ``.crc`` files, the marker)."""
    dataset = pads.dataset(str(folder), format="parquet")
    if "ntok" not in dataset.schema.names:  # no part file at all: nothing written
        return dataset.count_rows(), 0
    rows = total = 0
    for batch in dataset.to_batches(columns=["ntok"], filter=where):
        rows += batch.num_rows
        total += int(pc.sum(batch.column(0)).as_py() or 0)
    return rows, total


def _rows(folder: Path) -> int:
    """The number of rows of a folder of Parquet, from the footers alone."""
    return pads.dataset(str(folder), format="parquet").count_rows()


def _write_internal(df: DataFrame, path: Path) -> None:
    """Write a table only the job reads (a stage's rows, the parsed input) without
    Parquet's dictionary encoding: the texts, row ids and shingle hashes are nearly all distinct, so the
    writer filled a dictionary per column only to fall back to plain encoding (a tenth of the JVM's time
    in the job, 4% larger files without it)."""
    df.write.mode("overwrite").option("parquet.enable.dictionary", "false").parquet(str(path))


def _write_canonical(df: DataFrame, path: Path, partitions: int) -> None:
    """Write the job's output in a canonical layout (hash of row id, sorted), so its files, and a tokenizer
    or a training run reading them in order, do not depend on shuffle timing or the core count.

    The stages write their rows as they come, canonical or not: nothing the job decides depends on row
    order (dedup keeps the smallest row id, k-means fits on its sample in row-id order, the quality cut and
    the weighting sums are exact, the reported samples are sorted), so one shuffle of the texts at the end
    replaces one after every stage that shuffles (about 1.5 s each at 50,000 documents on two cores)."""
    df.repartition(partitions, "row_id").sortWithinPartitions("row_id").write.mode("overwrite").parquet(str(path))


JOB_FILE = "_job.json"  # the fingerprint of a temporary output
MARKER = "_haina_stage.json"  # a completed stage (Spark and pyarrow skip names starting with "_")
FAULT_POINT = "data_commit"  # HAINA_FAULTS=data_commit:crash@N: stop after the commit's N-th delete or rename


class _Ops:
    """The number of deletes and renames since the commit began (None before): the fault hook's clock."""

    count: int | None = None


def _done() -> None:
    if _Ops.count is not None:
        _Ops.count += 1
        faults.fire(FAULT_POINT, _Ops.count)


def _rename(src: Path, dst: Path) -> None:
    """A durable rename (both folders fsynced)."""
    src.rename(dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)
    _done()


def _unlink(path: Path) -> None:
    """A durable delete of one file."""
    path.unlink()
    fsync_dir(path.parent)
    _done()


def _remove_tree(path: Path) -> None:
    """Delete a folder so that no moment of it looks resumable: the fingerprint and the stage markers go
    first, durably; then every other file and folder, deepest first (a kill there leaves only data that
    nothing trusts)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        _unlink(path)
        return
    for name in (JOB_FILE, MARKER):
        for found in sorted(path.rglob(name)):
            _unlink(found)
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in [*files, *dirs]:
            entry = Path(folder) / name
            if entry.is_dir() and not entry.is_symlink():
                entry.rmdir()
            else:
                entry.unlink()
            _done()
    path.rmdir()
    _done()


def _discard(path: Path) -> None:
    """:func:`_remove_tree` on the way out of a failure: a second error must not hide the first."""
    with suppress(OSError):
        _remove_tree(path)


def _trash(output: Path) -> Path:
    """Where the commit puts what it deletes after publishing (the stages, an old output)."""
    return output.parent / f".{output.name}.trash"


def job_fingerprint(inputs: list[Path], cfg: PrepareConfig) -> str:
    """Inputs (path, size, mtime) and every config field that shapes the output."""
    config = cfg.model_dump(mode="json")
    for key in ("overwrite", "keep_intermediate"):
        config.pop(key, None)
    config["input"].pop("max_quarantine_share", None)  # a stop rule, not an output setting: raising it resumes
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
    blob = json.dumps({"inputs": files, "config": config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare_output(output: Path, overwrite: bool, fingerprint: str) -> Path:
    """The temporary output: resumed when a killed run with the same fingerprint left one."""
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise HainaError(f"{output}: output exists (set overwrite=true to replace it)")
    if output.exists() and not output.is_dir():
        raise HainaError(f"{output}: exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial"
    job = tmp / JOB_FILE
    if tmp.exists():
        if _fingerprint_of(job) == fingerprint:
            return tmp
        _remove_tree(tmp)
    tmp.mkdir()
    write_durable(job, json.dumps({"fingerprint": fingerprint}) + "\n")
    return tmp


def _fingerprint_of(job: Path) -> str | None:
    try:
        return json.loads(job.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):  # missing or unreadable: nothing to resume
        return None


def _lock(output: Path) -> Any:
    """An exclusive lock beside the output (released when the process ends, even by SIGKILL): two jobs
    never resume the same temporary output at once."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = open(output.parent / f".{output.name}.lock", "w")  # noqa: SIM115  (held for the whole job)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise HainaError(f"{output}: another `haina data prepare` is writing this output") from None
    return handle


def _files(folder: Path, name: str) -> dict[str, int]:
    """``name/relative path`` -> size of every file below ``folder`` (published as ``name``), the marker aside."""
    out = {}
    for parent, _, names in os.walk(folder):
        for file in names:
            path = Path(parent) / file
            if not (file == MARKER and path.parent == folder):
                out[f"{name}/{path.relative_to(folder).as_posix()}"] = path.stat().st_size
    return out


def _completed(path: Path, root: Path) -> dict[str, Any] | None:
    """The marker of a complete stage folder, else None. Complete: the marker is there and so is every file
    it lists, with its size; the folders it calls exact hold no other file (Spark would read one as data)."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        files, exact = marker["files"], marker["exact"]
        for rel, size in files.items():
            if (root / rel).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, unreadable, or an older marker
        return None
    for folder in exact:
        if set(_files(root / folder, folder)) != {rel for rel in files if rel.startswith(f"{folder}/")}:
            return None
    return marker


def _work(path: Path) -> Path:
    """A fresh hidden work folder for ``path``."""
    work = path.with_name(f".{path.name}.partial")
    _remove_tree(work)
    return work


def _publish(
    work: Path, path: Path, marker: dict[str, Any] | None = None, root: Path | None = None,
    extra: tuple[str, ...] = (), shared: tuple[str, ...] = (),
) -> None:
    """Every file made durable, then the marker (last, listing what is there), then one rename: the folder
    exists complete or not at all. ``extra`` are folders under ``root`` the stage published before (its
    removed rows), listed in the marker as exact; ``shared`` ones (the models, which later stages add to)
    are listed file by file only. A missing folder is skipped.

    No ``manifest.json``: Spark and pyarrow would read it as a Parquet part (they skip only names
    starting with ``_`` or ``.``, like the marker), and a manifest lists a folder's own files, not the
    nested ones of an output. An old ``path`` is moved aside first and deleted after."""
    fsync_tree(work)
    if marker is not None and root is not None:
        name = path.relative_to(root).as_posix()
        files = _files(work, name)
        exact = [name, *(f for f in extra if (root / f).is_dir())]
        for folder in (*extra, *shared):
            if (root / folder).is_dir():
                files.update(_files(root / folder, folder))
        write_durable(work / MARKER, json.dumps({**marker, "files": files, "exact": exact}, ensure_ascii=False) + "\n")
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        _remove_tree(old)
        _rename(path, old)
    publish_dir(work, path, manifest=False)
    _done()
    _remove_tree(old)


def run_pipeline(
    spark: SparkSession, inputs: list[Path], output: Path, cfg: PrepareConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Run every enabled stage on ``inputs`` and commit ``output``; returns the report."""
    inputs = check_inputs(inputs)
    output = Path(output).resolve()
    lock = _lock(output)
    try:
        return _run_locked(spark, inputs, output, cfg, progress)
    finally:
        Path(lock.name).unlink(missing_ok=True)  # a SIGKILL leaves it behind, harmlessly (hidden, unlocked)
        lock.close()


def _run_locked(
    spark: SparkSession, inputs: list[Path], output: Path, cfg: PrepareConfig, progress: bool
) -> dict[str, Any]:
    _Ops.count = None
    _remove_tree(_trash(output))  # what a kill during an earlier clean-up left (nothing reads it)
    tmp = _prepare_output(output, cfg.overwrite, job_fingerprint(inputs, cfg))
    bar = Progress(progress)
    started = time.perf_counter()
    try:
        report = _run(spark, inputs, tmp, cfg, bar)
        report["seconds"] = round(time.perf_counter() - started, 2)
        _commit(tmp, output, report, cfg.keep_intermediate)
    except TooManyBadRecords:
        raise  # the ingest stays, complete: a rerun with a higher share resumes after it
    except Exception:
        _discard(tmp)  # a failing stage: nothing worth resuming
        raise  # (a kill or Ctrl-C leaves the temporary output for the next run to resume)
    finally:
        _Ops.count = None
        spark.catalog.clearCache()
    report["output"] = str(output)
    return report


def _commit(tmp: Path, output: Path, report: dict[str, Any], keep_intermediate: bool) -> None:
    """Publish the temporary output as ``output``, then delete what is not part of it.

    In this order, each step one durable delete or rename: report.json; the fingerprint (from here a kill
    leaves nothing resumable, and the rerun starts afresh instead of trusting stages half deleted);
    ``stages/`` moved out to the trash; an old output (overwrite=true) moved there too; the publishing
    rename; and only then the trash deleted, where a kill leaves a hidden folder that the next run on
    this output deletes."""
    _Ops.count = 0
    write_durable(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _done()
    _unlink(tmp / JOB_FILE)
    trash = _trash(output)
    _remove_tree(trash)
    trash.mkdir()
    if not keep_intermediate and (tmp / "stages").exists():
        _rename(tmp / "stages", trash / "stages")
    if output.exists():
        _rename(output, trash / "old-output")
    publish_dir(tmp, output, manifest=False)
    _done()
    _remove_tree(trash)


def _damaged(parsed: Path) -> list[dict]:
    """:func:`~haina.data_spark.ingest.damaged_files` of the parsed table, read on the driver (two columns,
    the rows with a damage only): no Spark job."""
    table = pads.dataset(str(parsed), format="parquet").to_table(
        columns=["file", "damage"], filter=pc.field("damage").is_valid())
    rows = zip(table.column("file").to_pylist(), table.column("damage").to_pylist(), strict=True)
    return sorted(({"file": file, **json.loads(damage)} for file, damage in rows), key=lambda d: d["file"])


def _ingest(spark: SparkSession, inputs: list[Path], tmp: Path, cfg: PrepareConfig) -> dict[str, Any]:
    """Parse once into ``stages/00_ingest``: every record, with its document columns, the dedup columns
    ingest takes (:mod:`haina.data_spark.ingest_keys`) and, for a bad one, its reason. The quarantine is cut
    from it; the stages read the documents' columns of it (:func:`_ingested`), and near-dedup its own."""
    t0 = time.perf_counter()
    path = tmp / "stages" / "00_ingest"
    work = _work(path)
    _write_internal(read_inputs(spark, inputs, cfg, keys=True), work)
    damaged = _damaged(work)
    quarantine = _work(tmp / "quarantine")
    quarantined(spark.read.parquet(str(work))).write.mode("overwrite").parquet(str(quarantine))
    _publish(quarantine, tmp / "quarantine")
    docs_raw, tokens_raw = _counts(work, pc.field("bad").is_null())
    bad_rows = _rows(tmp / "quarantine")
    reasons = quarantine_summary(spark.read.parquet(str(tmp / "quarantine"))) if bad_rows else {}
    ingest = {"inputs": [str(p) for p in inputs], "documents": docs_raw, "tokens": tokens_raw,
              "quarantined": bad_rows, "quarantine_reasons": reasons,
              "damaged_files": damaged, "seconds": round(time.perf_counter() - t0, 2)}
    faults.fire("data_stage", "ingest")
    _publish(work, path, {"stage": "ingest", "row": ingest}, tmp, ("quarantine",))
    return ingest


def _ingested(spark: SparkSession, path: Path, cfg: PrepareConfig) -> tuple[DataFrame, DataFrame | None]:
    """(the documents with the columns the stages carry, the near-dedup table or None) of ingest's folder.
    Parquet reads only the columns asked for, so the shingle hashes, as large as the texts, stay on disk
    until near-dedup reads them, wherever it stands in the order."""
    parsed = spark.read.parquet(str(path))
    carried = tuple(f.name for f in key_fields(cfg) if f.name not in NEAR_COLUMNS)
    near = [f.name for f in key_fields(cfg) if f.name in NEAR_COLUMNS]
    keys = parsed.filter(F.col("bad").isNull()).select("row_id", *near) if near else None
    return documents(parsed, carried), keys


def _stage(
    ctx: StageContext, current: DataFrame, index: int, name: str, run: StageFn, sizes: tuple[int, int, int]
) -> dict[str, Any]:
    """Run one stage: removed rows to ``removed/stage=NAME``, kept rows to ``stages/NN_NAME`` (last)."""
    spark, tmp = ctx.spark, ctx.workdir
    docs_in, tokens_in, tokens_raw = sizes
    t0 = time.perf_counter()
    result = run(current, ctx)
    path = tmp / "stages" / f"{index:02d}_{name}"
    removed_docs = removed_tokens = 0
    removed_path = tmp / "removed" / f"stage={name}"
    _remove_tree(removed_path)
    if result.removed is not None:
        work = _work(removed_path)
        result.removed.write.mode("overwrite").parquet(str(work))
        _publish(work, removed_path)
        removed_docs, removed_tokens = _counts(removed_path)
    work = _work(path)
    _write_internal(result.kept, work)
    spark.catalog.clearCache()
    docs_out, tokens_out = _counts(work)
    row = {
        "stage": name, "docs_in": docs_in, "docs_out": docs_out, "docs_removed": removed_docs,
        "tokens_in": tokens_in, "tokens_out": tokens_out, "tokens_removed_with_docs": removed_tokens,
        "tokens_removed_in_docs": tokens_in - tokens_out - removed_tokens,
        "share_of_raw_tokens_removed": round((tokens_in - tokens_out) / tokens_raw, 6) if tokens_raw else 0.0,
        "seconds": round(time.perf_counter() - t0, 2), **result.notes,
    }
    faults.fire("data_stage", name)  # test hook: a kill after the data, before the stage is complete
    _publish(work, path, {"stage": name, "row": row}, tmp, (f"removed/stage={name}",), ("models",))
    return row


def fit_ahead(cfg: PrepareConfig) -> None:
    """Fit the line classifiers in a driver thread, started before the Spark session: the JVM's start (about
    4 s, a core and a bit busy) hides the quality model's 2 s fit, which used to compete with ingest's
    executors and, before that, left them idle between exact dedup and heuristics. A fit is memoised, and a
    stage that asks for one still being fitted waits for it; a fit that fails here fails again, with its
    message, in its stage."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="haina-fit")
    for section, model_of in (("quality", quality.model_of), ("safety", safety.model_of)):
        if getattr(cfg, section).enabled:
            pool.submit(model_of, getattr(cfg, section))
    pool.shutdown(wait=False)


def _run(spark: SparkSession, inputs: list[Path], tmp: Path, cfg: PrepareConfig, bar: Progress) -> dict[str, Any]:
    (tmp / "config.yaml").write_text(dump_prepare_config(cfg), encoding="utf-8")
    stages_dir = tmp / "stages"
    ctx = StageContext(spark, cfg, tmp)
    resumed: list[str] = []
    done = _completed(stages_dir / "00_ingest", tmp)
    if done is not None:
        ingest = done["row"]
        resumed.append("ingest")
    else:
        with bar.stage("ingest"):
            ingest = _ingest(spark, inputs, tmp, cfg)
    check_quarantine_share(ingest, cfg, tmp / "quarantine")
    current, ctx.near_keys = _ingested(spark, stages_dir / "00_ingest", cfg)
    docs_raw, tokens_raw = ingest["documents"], ingest["tokens"]
    bar.console.print(
        f"[green]✓[/] {'ingest':<12} {docs_raw:>8,} docs, {ingest['quarantined']:,} quarantined  {ingest['seconds']:.1f}s"
    )
    stages: list[dict[str, Any]] = []
    docs_in, tokens_in = docs_raw, tokens_raw
    resuming = done is not None  # a stage is reused only if every stage before it was
    order = ordered_stages(cfg.stage_order)
    enabled = [name for name, _, section in order if section is None or getattr(cfg, section).enabled]
    for index, (name, run, section) in enumerate(order, start=1):
        ctx.following = enabled[enabled.index(name) + 1] if name in enabled[:-1] else None
        if section is not None and not getattr(cfg, section).enabled:
            row = {"stage": name, "skipped": True}
            stages.append(row)
            bar.done(name, row)
            continue
        path = stages_dir / f"{index:02d}_{name}"
        done = _completed(path, tmp) if resuming else None
        if done is not None:
            row = done["row"]
            resumed.append(name)
        else:
            resuming = False
            with bar.stage(name):
                row = _stage(ctx, current, index, name, run, (docs_in, tokens_in, tokens_raw))
        current = spark.read.parquet(str(path))
        stages.append(row)
        bar.done(name, row)
        docs_in, tokens_in = row["docs_out"], row["tokens_out"]
    for leftover in ("kept", "tokenized", "blend.json", "removed/stage=none"):  # redone as a whole
        _remove_tree(tmp / leftover)
    internal = [c for c in current.columns if c.startswith("_")]
    _write_canonical(current.drop(*internal), tmp / "kept", cfg.spark.shuffle_partitions)
    if not (tmp / "removed").exists():  # an empty table, so that readers of removed/ need no special case
        work = _work(tmp / "removed" / "stage=none")
        spark.createDataFrame([], "row_id long, reason string").write.parquet(str(work))
        _publish(work, tmp / "removed" / "stage=none")
    report: dict[str, Any] = {
        "token_unit": "approx (words + CJK characters + symbols) until tokenized",
        "ingest": ingest, "stages": stages,
        "kept": {"documents": docs_in, "tokens": tokens_in,
                 "share_of_raw_tokens": round(tokens_in / tokens_raw, 6) if tokens_raw else 0.0},
    }
    if resumed:
        report["resumed_stages"] = resumed
    if cfg.tokenize.model is not None:
        with bar.stage("tokenize"):
            t0 = time.perf_counter()
            blend = write_shards(spark, spark.read.parquet(str(tmp / "kept")), tmp, cfg.tokenize.model,
                                 partitions=cfg.tokenize.partitions, append_eos=cfg.tokenize.append_eos)
            report["tokenized"] = {"categories": blend_summary(blend), "seconds": round(time.perf_counter() - t0, 2)}
        bar.console.print(f"[green]✓[/] {'tokenize':<12} {sum(d['tokens'] for d in blend['datasets']):,} tokens "
                          f"in {len(blend['datasets'])} parts")
    return report
