"""The whole job end to end: stage outcomes, report, quarantine, atomic output, determinism, blend."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from haina.core.errors import ConfigError, HainaError, InputFileError
from haina.data_spark.config import load_prepare_config
from haina.data_spark.pipeline import run_pipeline
from haina.data_spark.prepare import kept_files, prepare_main
from tests.data_helpers import (
    BAD_LINES,
    TEST_OVERRIDES,
    known_corpus,
    spark,  # noqa: F401  (session fixture)
    tiny_tokenizer,
    write_jsonl,
)

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def job(spark, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("job")
    inputs = [write_jsonl(root / "a.jsonl", known_corpus()[:6]), write_jsonl(root / "b.jsonl", known_corpus()[6:], BAD_LINES)]
    model = tiny_tokenizer(root / "tok")
    # the CLI run of test_data_cli has the same settings (the k-means layout follows spark.shuffle_partitions)
    overrides = [*TEST_OVERRIDES, "spark.shuffle_partitions=2", f"tokenize.model={model}", "safety.blocklist=['[unsafe-demo]']"]
    cfg = load_prepare_config(None, overrides)
    first = run_pipeline(spark, inputs, root / "out1", cfg, progress=False)
    shutil.copytree(root / "out1", root / "out2")  # for the re-tokenize test, which replaces its shards
    return {"root": root, "inputs": inputs, "cfg": cfg, "reports": (first,), "model": model}


def _removed(out: Path) -> dict[str, str]:
    table = ds.dataset(out / "removed", format="parquet", partitioning="hive").to_table()
    return dict(zip(table.column("doc_id").to_pylist(), table.column("stage").to_pylist(), strict=True))


@pytest.mark.integration
def test_every_document_meets_its_fate(job: dict) -> None:
    out = job["root"] / "out1"
    removed = _removed(out)
    kept = set(pq.read_table(out / "kept").column("doc_id").to_pylist())
    for record in known_corpus():
        if record["expect"] == "kept":
            assert record["id"] in kept, record["id"]
        else:
            assert removed.get(record["id"]) == record["expect"], (record["id"], removed.get(record["id"]))
    columns = set(pq.read_schema(kept_files(out)[0]).names)
    assert {"quality_score", "near_dup_size", "emb_cluster", "emb_density", "safety_score", "category",
            "weight", "bucket"} <= columns
    assert not any(c.startswith("_") for c in columns)


@pytest.mark.integration
def test_report_counts_and_quarantine(job: dict) -> None:
    report = job["reports"][0]
    on_disk = json.loads((job["root"] / "out1" / "report.json").read_text())
    assert on_disk["stages"] == report["stages"]
    assert report["ingest"]["documents"] == len(known_corpus())
    assert report["ingest"]["quarantined"] == len(BAD_LINES)
    quarantine = pq.read_table(job["root"] / "out1" / "quarantine").to_pylist()
    assert len(quarantine) == len(BAD_LINES) and all(r["reason"] and r["file"].endswith("b.jsonl") for r in quarantine)
    docs = report["ingest"]["documents"]
    for row in report["stages"]:
        assert row["docs_in"] == docs and row["docs_out"] == docs - row["docs_removed"]
        assert row["tokens_out"] <= row["tokens_in"]
        docs = row["docs_out"]
    assert report["kept"]["documents"] == docs
    assert (job["root"] / "out1" / "config.yaml").is_file()


@pytest.mark.integration
def test_two_runs_are_identical(job: dict, cli_runs: dict) -> None:
    """This in-process run (local[2]) and the CLI's run of the same input in another process (local[1],
    test_data_cli) give the same rows, removals and blend weights."""
    def snapshot(out: Path) -> list:
        rows = pq.read_table(out / "kept").to_pylist()
        return sorted((r["row_id"], r["text"], r["weight"], r["bucket"], r["emb_cluster"]) for r in rows)

    other = cli_runs["root"] / "cli"
    assert cli_runs["cli"]["prepare"]["rc"] == cli_runs["cli"]["tokenize"]["rc"] == 0
    assert snapshot(job["root"] / "out1") == snapshot(other)

    def layout(out: Path) -> list:  # the kept files in order, what a tokenizer trained on them reads
        return [pq.read_table(f, columns=["row_id"]).column(0).to_pylist()
                for f in sorted((out / "kept").glob("part-*.parquet"))]

    assert layout(job["root"] / "out1") == layout(other)  # whatever the core count
    assert _removed(job["root"] / "out1") == _removed(other)

    def weights(out: Path) -> list:
        return [(e["category"], e["weight"]) for e in json.loads((out / "blend.json").read_text())["datasets"]]

    assert weights(job["root"] / "out1") == weights(other)


@pytest.mark.integration
def test_output_is_atomic(job: dict, spark, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    with pytest.raises(HainaError, match="output exists"):
        run_pipeline(spark, job["inputs"], job["root"] / "out1", job["cfg"], progress=False)
    from haina.data_spark import pipeline

    def boom(df, ctx):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(pipeline, "STAGES", [*pipeline.STAGES[:2], ("boom", boom, None)])
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(spark, job["inputs"], job["root"] / "out3", job["cfg"], progress=False)
    assert not (job["root"] / "out3").exists()
    assert not [p for p in job["root"].iterdir() if p.name.startswith(".out3")]


def _one_line(kind: type[HainaError], match: str, func, *args, **kwargs) -> str:
    """The ``kind`` error ``func`` raises: one line (no newline anywhere, not even at the end), matching ``match``."""
    with pytest.raises(kind) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    assert re.search(match, message), (match, message)
    return message


def test_bad_user_input_is_one_line_haina_error(tmp_path: Path) -> None:
    _one_line(InputFileError, "nope.jsonl: input not found", prepare_main, [tmp_path / "nope.jsonl"], tmp_path / "out")
    (tmp_path / "x.csv").write_text("a,b\n")
    _one_line(InputFileError, "x.csv.*unsupported input", prepare_main, [tmp_path / "x.csv"], tmp_path / "out")
    _one_line(ConfigError, r"^near_dedup\.num_perm: ", prepare_main, [tmp_path / "x.csv"], tmp_path / "out",
              overrides=["near_dedup.num_perm=0"])
    good = write_jsonl(tmp_path / "a.jsonl", known_corpus()[:1])
    _one_line(ConfigError, "tokenize.model=.*none.model: tokenizer model not found", prepare_main, [good],
              tmp_path / "out", overrides=[f"tokenize.model={tmp_path / 'none.model'}"])
    _one_line(InputFileError, "no kept documents", kept_files, tmp_path)
    assert not (tmp_path / "out").exists()


def _check_blend_against_kept(out: Path, model: Path, entries: list[dict]) -> None:
    """blend.json and the shards recomputed from the kept documents alone: a part holds exactly the
    SentencePiece ids + eos of its (category, bucket)'s kept documents, and its weight is its share of
    sum(weight x tokens) over every kept document."""
    import warnings

    import sentencepiece as spm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = spm.SentencePieceProcessor(model_file=str(model))
    kept = pq.read_table(out / "kept", columns=["category", "bucket", "weight", "text"]).to_pylist()
    assert len(kept) == sum(r["expect"] == "kept" for r in known_corpus())
    assert not any("\u2581" in r["text"] for r in kept)  # plain SentencePiece ids are the tokenizer's here
    docs: dict[tuple[str, str], list[list[int]]] = {}
    mass: dict[tuple[str, str], float] = {}
    for row in kept:
        ids = [*sp.encode(row["text"]), sp.eos_id()]
        key = (row["category"], row["bucket"])
        docs.setdefault(key, []).append(ids)
        mass[key] = mass.get(key, 0.0) + row["weight"] * len(ids)
    assert len({round(r["weight"], 6) for r in kept}) > 1, "equal weights would not tell weighted tokens from tokens"
    total = sum(mass.values())
    parts: dict[tuple[str, str], list[dict]] = {}
    for entry in entries:
        parts.setdefault((entry["category"], entry["bucket"]), []).append(entry)
    assert set(parts) == set(docs)
    for key, group in parts.items():
        assert sum(e["weight"] for e in group) == pytest.approx(mass[key] / total, rel=1e-9, abs=1e-12), key
        contents = []
        for entry in group:
            shard = IndexedDataset(str(out / entry["prefix"]))
            part = [shard[i].tolist() for i in range(len(shard))]
            assert entry["documents"] == len(part) and entry["tokens"] == sum(map(len, part)), entry
            contents += part
        assert sorted(contents) == sorted(docs[key]), key


@pytest.mark.integration
def test_blend_frequencies_match_weights(job: dict, tmp_path: Path) -> None:
    """blend.json follows the weights: a part's weight is its share of the kept documents' weighted tokens
    and its shard holds their tokens; megatron-core's blended dataset then samples parts at those rates
    (realised frequencies within 2%)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    import torch

    from haina.core.distributed import init_distributed
    from haina.core.tokenizer import Tokenizer

    init_distributed(torch.device("cpu"))  # megatron's builders expect a process group (a world of one)
    out = job["root"] / "out1"
    blend = json.loads((out / "blend.json").read_text())
    entries = blend["datasets"]
    assert len(entries) >= 3 and sum(e["weight"] for e in entries) == pytest.approx(1.0)
    assert {e["category"] for e in entries} == {"en", "zh", "code"}
    for entry in entries:
        assert (out / f"{entry['prefix']}.bin").is_file() and (out / f"{entry['prefix']}.idx").is_file()
    _check_blend_against_kept(out, job["model"], entries)
    tokenizer = Tokenizer(job["model"])

    class TokenInfo:
        eod = tokenizer.eos_id
        vocab_size = tokenizer.vocab_size
        unique_identifiers = {"class": "test", "eod": eod, "vocab_size": vocab_size}

    n = 20_000
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=16, split="100,0,0", path_to_cache=str(tmp_path / "cache"),
        blend=([str(out / e["prefix"]) for e in entries], [e["weight"] for e in entries]),
        tokenizer=TokenInfo(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
    )
    dataset = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, config).build()[0]
    counts = Counter(np.asarray(dataset.dataset_index).tolist())
    for index, entry in enumerate(entries):
        realised = counts[index] / len(dataset)
        assert abs(realised - entry["weight"]) <= 0.02 * entry["weight"] + 1 / n, (entry, realised)


@pytest.mark.integration
def test_retokenize_replaces_shards_atomically(job: dict) -> None:
    """`haina data tokenize --prepared` republishes tokenized/ and blend.json in place of the old ones."""
    from haina.data_spark.prepare import tokenize_main

    out = job["root"] / "out2"
    before = json.loads((out / "blend.json").read_text())
    summary = tokenize_main(out, job["model"], overrides=TEST_OVERRIDES)
    assert json.loads((out / "blend.json").read_text()) == before  # deterministic: the same shards again
    assert summary["parts"] == len(before["datasets"])
    assert json.loads((out / "report.json").read_text())["tokenized"] == summary
    for entry in before["datasets"]:
        assert (out / f"{entry['prefix']}.bin").is_file() and (out / f"{entry['prefix']}.idx").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no staging or old folders left"
