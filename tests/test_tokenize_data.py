"""JSONL/Parquet documents to Megatron .bin/.idx, read back with megatron-core; the demo corpus."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from haina.core.config import TokenizerConfig
from haina.core.errors import InputFileError
from haina.core.tokenizer import Tokenizer
from haina.data_spark.tokenize import tokenize_to_indexed
from haina.tools.tokenizer import train_tokenizer

DOCS = [
    "First document.\nIt has two lines.",
    "def f(x):\n    return x + 1\n",
    "中文文档，包含数字 2024 和表情 😀。",
    "",  # skipped: nothing to learn from an empty document
    "short",
]


def _indexed(prefix: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix))


def _write_jsonl(path: Path, texts: list[str], *, key: str = "text") -> Path:
    lines = "".join(json.dumps({key: t, "source": "test"}, ensure_ascii=False) + "\n" for t in texts)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("tok")
    source = folder / "train.txt"
    text = "\n".join(topics[name] for name in sorted(topics)[:6]) + "\n中文文档，包含数字和表情。\n" * 10
    source.write_text(text, encoding="utf-8")
    return train_tokenizer([source], folder / "tok", TokenizerConfig(vocab_size=512))


@pytest.fixture(scope="module")
def tok(model: Path) -> Tokenizer:
    return Tokenizer(model)


def _check(prefix: Path, texts: list[str], tok: Tokenizer, *, eos: bool = True) -> None:
    data = _indexed(prefix)
    kept = [t for t in texts if t]
    assert len(data) == len(kept)
    assert len(data.document_indices) == len(kept) + 1
    for i, text in enumerate(kept):
        expected = tok.encode(text) + ([tok.eos_id] if eos else [])
        assert data[i].tolist() == expected
        assert tok.decode(data[i].tolist()) == text


def test_jsonl_round_trip(tmp_path: Path, model: Path, tok: Tokenizer) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    stats = tokenize_to_indexed([source], tmp_path / "out" / "docs", model, progress=False)
    assert stats["documents"] == 4 and stats["skipped_empty"] == 1 and stats["dtype"] == "uint16"
    assert stats["tokens"] == sum(len(tok.encode(t)) + 1 for t in DOCS if t)
    _check(tmp_path / "out" / "docs", DOCS, tok)
    assert _indexed(tmp_path / "out" / "docs").index.dtype == np.uint16
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.bin", "docs.idx"]


def test_parquet_gzip_and_several_inputs(tmp_path: Path, model: Path, tok: Tokenizer) -> None:
    many = [f"document number {i} " * (i % 7 + 1) for i in range(2500)]  # several Parquet batches
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": many, "id": list(range(len(many)))}), parquet, row_group_size=1000)
    gz = _write_jsonl(tmp_path / "docs.jsonl.gz", DOCS, key="content")
    stats = tokenize_to_indexed([parquet, gz], tmp_path / "mixed", model, text_key="content", progress=True)
    assert stats["documents"] == len(many) + 4 and stats["files"] == 2
    _check(tmp_path / "mixed", many + DOCS, tok)


def test_without_eos(tmp_path: Path, model: Path, tok: Tokenizer) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    tokenize_to_indexed([source], tmp_path / "noeos", model, append_eos=False, progress=False)
    _check(tmp_path / "noeos", DOCS, tok, eos=False)


def test_bad_inputs_fail_clearly(tmp_path: Path, model: Path) -> None:
    good = _write_jsonl(tmp_path / "good.jsonl", ["fine"])
    out = tmp_path / "out" / "x"

    def fails(inputs: list[Path], match: str, tokenizer: Path = model) -> None:
        with pytest.raises(InputFileError, match=match) as info:
            tokenize_to_indexed(inputs, out, tokenizer, progress=False)
        assert "\n" not in str(info.value)
        assert not out.parent.exists() or not list(out.parent.iterdir()), "no partial output"

    fails([good, tmp_path / "missing.jsonl"], "missing.jsonl: input file not found")
    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhello\n")
    fails([csv], r"docs.csv: unsupported input extension")
    no_key = tmp_path / "no_key.jsonl"
    no_key.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    fails([good, no_key], r"no_key.jsonl:2: record has no 'text' field")
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "ok"}\n{"text": \n')
    fails([not_json], r"broken.jsonl:2: not valid JSON")
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('["text"]\n')
    fails([not_object], r"list.jsonl:1: each line must be a JSON object")
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    fails([not_utf8], r"latin1.jsonl:1: not valid UTF-8")
    wrong_type = tmp_path / "number.jsonl"
    wrong_type.write_text('{"text": 5}\n')
    fails([wrong_type], r"number.jsonl:1: field 'text' is int")
    parquet = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    fails([parquet], r"nocol.parquet: no 'text' column")
    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_bytes(b"not gzip at all")
    fails([fake_gz], r"fake.jsonl.gz: cannot read")
    fails([good], "none.model: tokenizer model not found", tokenizer=tmp_path / "none.model")


def test_demo_corpus(tmp_path: Path) -> None:
    from haina.tools.demo.corpus import build_corpus

    paths = build_corpus(tmp_path / "demo", max_mb=0.12, seed=3)
    train = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    heldout = [json.loads(line) for line in paths["heldout"].read_text(encoding="utf-8").splitlines()]
    assert {r["source"] for r in train} == {"en", "code", "zh"}
    assert {r["source"] for r in heldout} == {"en", "code", "zh"}
    assert all(r["planted"] is None for r in heldout)
    ids = [r["id"] for r in train + heldout]
    assert len(ids) == len(set(ids))
    by_id = {r["id"]: r for r in train}
    kinds = {r["planted"] for r in train} - {None}
    assert kinds == {"exact_dup", "near_dup", "spam", "boilerplate", "unsafe"}
    for record in train:
        if record["planted"] == "exact_dup":
            assert record["text"] == by_id[record["dup_of"]]["text"]
        elif record["planted"] == "near_dup":
            original = by_id[record["dup_of"]]["text"]
            assert record["text"] != original and len(record["text"]) < len(original) * 1.1
        elif record["planted"] == "unsafe":
            assert "[unsafe-demo]" in record["text"]
    assert any("    " in r["text"] for r in train if r["source"] == "code")
    assert any("/" not in r["text"] and "的" in r["text"] for r in train if r["source"] == "zh")
    again = build_corpus(tmp_path / "again", max_mb=0.12, seed=3)
    assert again["train"].read_bytes() == paths["train"].read_bytes()
