"""Every stage on small inputs with known answers, in a shared local[2] Spark session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from haina.core.errors import ConfigError
from haina.data_spark.config import load_prepare_config
from haina.data_spark.connected_components import connected_components
from haina.data_spark.ingest import documents, quarantined, read_inputs
from haina.data_spark.ingest_keys import unpacked
from haina.data_spark.minhash import shingles
from haina.data_spark.stages import (
    base,
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
from haina.data_spark.stages.base import StageContext
from tests.data_helpers import (
    BAD_LINES,
    SPAM_LINE,
    TEST_OVERRIDES,
    UNSAFE_LINE,
    known_corpus,
    spark,  # noqa: F401  (session fixture)
    write_jsonl,
)

pytestmark = [pytest.mark.timeout(600), pytest.mark.integration]  # every test runs on the Spark session


def _ctx(spark, tmp_path: Path, *overrides: str) -> StageContext:  # noqa: F811
    return StageContext(spark, load_prepare_config(None, [*TEST_OVERRIDES, *overrides]), tmp_path)


def _docs(spark, tmp_path: Path, records: list[dict], ctx: StageContext):  # noqa: F811
    path = write_jsonl(tmp_path / "in.jsonl", records)
    return documents(read_inputs(spark, [path], ctx.cfg)).cache()


def _ids(df) -> set[str]:
    return {r["doc_id"] for r in df.select("doc_id").collect()}


def test_quarantine_reasons(spark, tmp_path: Path) -> None:  # noqa: F811
    ctx = _ctx(spark, tmp_path)
    path = write_jsonl(tmp_path / "in.jsonl", known_corpus()[:2], BAD_LINES)
    parsed = read_inputs(spark, [path], ctx.cfg).cache()
    assert _ids(documents(parsed)) == {"en-a", "en-b"}
    reasons = sorted(r["reason"] for r in quarantined(parsed).collect())
    assert len(reasons) == len(BAD_LINES)
    for expected in ("malformed JSON", "invalid UTF-8", "missing field", "empty document", "is int",
                     "not a JSON object", "huge document"):
        assert any(expected in r for r in reasons), (expected, reasons)


def test_exact_dedup_keeps_first(spark, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """The first of each group of copies stays, whether the shared keys are broadcast to the join or not."""
    ctx = _ctx(spark, tmp_path)
    records = known_corpus()
    records.append({"id": "en-a-copy2", "text": records[0]["text"] + " !"})  # punctuation is normalised away
    docs = _docs(spark, tmp_path, records, ctx)
    first = docs.filter("doc_id = 'en-a'").first()["row_id"]
    for limit in (base.BROADCAST_ROWS, 0):
        monkeypatch.setattr(base, "BROADCAST_ROWS", limit)
        result = exact_dedup.run(docs, ctx)
        removed = result.removed.collect()
        assert sorted(r["doc_id"] for r in removed) == ["en-a-copy", "en-a-copy2"], limit
        assert {r["dup_of"] for r in removed} == {first}
        assert result.kept.count() == len(records) - 2 and "_first" not in result.kept.columns


def test_heuristics_spam_and_chinese(spark, tmp_path: Path) -> None:  # noqa: F811
    ctx = _ctx(spark, tmp_path)
    records = known_corpus() + [{"id": "boiler", "text": "Subscribe to our newsletter!\n" + known_corpus()[1]["text"]}]
    result = heuristics.run(_docs(spark, tmp_path, records, ctx), ctx)
    assert _ids(result.removed) == {"spam"}  # zh documents survive: no English word rules on them
    boiler = result.kept.filter("doc_id = 'boiler'").first()
    assert boiler["lines_removed"] == 1 and "newsletter" not in boiler["text"]


def test_quality_removes_spam_sentence(spark, tmp_path: Path) -> None:  # noqa: F811
    """The classifier at a fixed cut (0.5): this corpus still holds the spam document that heuristics would
    have removed, so the default cut (3% of the characters) would be spent on it; the default cut on the
    corpus as the job hands it over is tested in test_data_quality.py."""
    ctx = _ctx(spark, tmp_path, "quality.sentence_threshold=0.5")
    result = quality.run(_docs(spark, tmp_path, known_corpus(), ctx), ctx)
    rows = {r["doc_id"]: r for r in result.kept.collect()}
    assert SPAM_LINE not in rows["en-d"]["text"] and rows["en-d"]["sentences_removed"] >= 1
    assert rows["en-a"]["sentences_removed"] == 0 and rows["en-a"]["quality_score"] > 0.5
    assert rows["code-a"]["quality_score"] == 1.0  # code is not judged by a prose classifier
    assert (ctx.workdir / "models" / "quality.npz").is_file()


def test_line_dedup_first_occurrence(spark, tmp_path: Path) -> None:  # noqa: F811
    """The one pass over paragraphs and lines and a line pass alone: the first occurrence stays, and a
    document left blank goes, with its reason."""
    shared = "This paragraph is repeated verbatim in two different documents of the corpus."
    records = [
        {"id": "first", "text": f"Opening words of the first one.\n\n{shared}"},
        {"id": "second", "text": f"{shared}\n\nClosing words that belong to the second document only."},
        {"id": "only-shared", "text": shared},
    ]
    for units in ("[paragraph, line]", "[line]"):
        ctx = _ctx(spark, tmp_path, f"line_dedup.units={units}")
        result = line_dedup.run(_docs(spark, tmp_path, records, ctx), ctx)
        kept = {r["doc_id"]: r["text"] for r in result.kept.collect()}
        assert kept["first"].endswith(shared)
        assert kept["second"] == "Closing words that belong to the second document only."
        assert set(kept) == {"first", "second"} and "_empty" not in result.kept.columns
        assert [(r["doc_id"], r["reason"]) for r in result.removed.collect()] == [
            ("only-shared", "line_dedup: every unit repeated elsewhere")], units


def _chain() -> list[dict]:
    """A ~ B (J 0.85) and B ~ C (J 0.81), but A and C are J 0.69 apart: one component, two removals at most."""
    a = [f"w{(i * 7919) % 5000}" for i in range(200)]
    b = [f"x{i}" if i % 50 == 0 else w for i, w in enumerate(a)]
    c = [f"y{i}" if i % 50 == 25 else w for i, w in enumerate(b)]
    return [{"id": f"chain-{name}", "text": " ".join(words)} for name, words in zip("abc", (a, b, c), strict=True)]


def test_near_dedup_pair_chain_and_short_documents(spark, tmp_path: Path) -> None:  # noqa: F811
    ctx = _ctx(spark, tmp_path)
    chain = _chain()
    size = ctx.cfg.near_dedup.shingle_size
    jac = [len(x & y) / len(x | y) for x, y in (
        (set(shingles(chain[i]["text"], size)), set(shingles(chain[j]["text"], size))) for i, j in ((0, 1), (1, 2), (0, 2))
    )]
    assert jac[0] >= 0.8 and jac[1] >= 0.8 and jac[2] < 0.8, jac
    records = known_corpus() + [{"id": f"short-{i}", "text": f"tiny {i}"} for i in range(3)] + chain
    result = near_dedup.run(_docs(spark, tmp_path, records, ctx), ctx)
    removed = {r["doc_id"]: r["dup_of"] for r in result.removed.collect()}
    # en-a-copy is an exact duplicate (exact dedup would have taken it first); en-b-near is the near copy.
    # chain-c joined chain-a's component only through chain-b, so it is not removed as chain-a's copy.
    assert set(removed) == {"en-a-copy", "en-b-near", "chain-b"}
    sizes = {r["doc_id"]: r["near_dup_size"] for r in result.kept.collect()}
    assert sizes["en-b"] == 2 and sizes["short-0"] == sizes["short-1"] == 1
    assert sizes["chain-a"] == sizes["chain-c"] == 3


def test_candidate_edges_link_each_bucket_to_its_smallest_id(spark, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """Every member of a shared LSH bucket is linked to the bucket's smallest row id, whether the shared
    buckets are broadcast to the join or not; the reference is read off the band keys in Python."""
    ctx = _ctx(spark, tmp_path)
    signed, _, _ = near_dedup.signatures(_docs(spark, tmp_path, known_corpus() + _chain(), ctx), ctx.cfg.near_dedup)
    buckets: dict[tuple[int, int], list[int]] = {}
    for row in signed.select("row_id", "_bands").collect():
        for band, key in enumerate(row["_bands"] or ()):
            buckets.setdefault((band, key), []).append(row["row_id"])
    expected = {(i, min(ids)) for ids in buckets.values() for i in ids if i != min(ids)}
    assert len(expected) >= 3  # the near copy and the chain share buckets
    for limit in (base.BROADCAST_ROWS, 0):
        monkeypatch.setattr(base, "BROADCAST_ROWS", limit)
        assert {(r["src"], r["dst"]) for r in near_dedup.candidate_edges(signed).collect()} == expected, limit


def test_spark_signatures_equal_datasketch(spark, tmp_path: Path) -> None:  # noqa: F811
    """``near_dedup.shingle_hash=sha1``: the executors' signatures are datasketch's, value for value."""
    ctx = _ctx(spark, tmp_path, "near_dedup.shingle_hash=sha1")
    records = known_corpus()
    signed, _, _ = near_dedup.signatures(_docs(spark, tmp_path, records, ctx), ctx.cfg.near_dedup, with_signature=True)
    cfg = ctx.cfg.near_dedup
    texts = {r["id"]: r["text"] for r in records}
    for row in signed.select("doc_id", "_sig").collect():
        reference = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=cfg.scheme)
        reference.update_batch(shingles(texts[row["doc_id"]], cfg.shingle_size))
        ours = unpacked(row["_sig"])
        assert np.array_equal(ours, reference.hashvalues.astype(np.uint32)), row["doc_id"]


def test_fast_signatures_sign_the_same_shingles(spark, tmp_path: Path) -> None:  # noqa: F811
    """The default ``fast`` shingle hash: one hash per distinct shingle (the sets ``shingles`` gives), and
    signatures whose agreement estimates the shingle sets' Jaccard as datasketch's does."""
    ctx = _ctx(spark, tmp_path)
    assert ctx.cfg.near_dedup.shingle_hash == "fast"
    records = known_corpus()
    signed, _, _ = near_dedup.signatures(_docs(spark, tmp_path, records, ctx), ctx.cfg.near_dedup, with_signature=True)
    size = ctx.cfg.near_dedup.shingle_size
    texts = {r["id"]: r["text"] for r in records}
    rows = {r["doc_id"]: r for r in signed.select("doc_id", "_sig", "_hv").collect()}
    for doc_id, row in rows.items():
        assert len(unpacked(row["_hv"])) == len(set(shingles(texts[doc_id], size))), doc_id
    a, b = rows["en-b"], rows["en-b-near"]
    exact = len(set(shingles(texts["en-b"], size)) & set(shingles(texts["en-b-near"], size))) / len(
        set(shingles(texts["en-b"], size)) | set(shingles(texts["en-b-near"], size)))
    estimate = np.mean(unpacked(a["_sig"]) == unpacked(b["_sig"]))
    assert abs(estimate - exact) < 0.1 and exact > 0.5, (estimate, exact)
    assert np.mean(unpacked(rows["en-a"]["_sig"]) == unpacked(rows["en-c"]["_sig"])) < 0.05


def test_connected_components_chain_and_star(spark) -> None:  # noqa: F811
    chain = [(i, i + 1) for i in range(100, 140)]  # one path of 41 nodes, listed in order
    star = [(7, leaf) for leaf in (90, 3, 55, 12)]  # centre 7, smallest member 3
    pair = [(500, 400)]
    edges = spark.createDataFrame(chain[::-1] + star + pair, "src long, dst long")
    stats: dict = {}
    labels = {r["id"]: r["component"] for r in connected_components(edges, stats=stats).collect()}
    assert 2 <= stats["rounds"] <= 8  # pointer jumping: about log2(41) rounds for the chain, not 40
    assert all(labels[n] == 100 for n in range(100, 141))
    assert all(labels[n] == 3 for n in (7, 90, 3, 55, 12))
    assert labels[400] == labels[500] == 400
    assert len(labels) == 41 + 5 + 2
    with pytest.raises(ConfigError, match=r"^near_dedup.max_iterations=2: connected components still changing"):
        connected_components(edges, max_iterations=2)


def test_components_on_the_driver_equal_the_spark_rounds(spark) -> None:  # noqa: F811
    """near-dedup's components(): the driver's labelling (few edges) is the Spark rounds' labelling."""
    from haina.data_spark.connected_components import components

    chain = [(i, i + 1) for i in range(100, 140)]
    edges = spark.createDataFrame(chain[::-1] + [(7, leaf) for leaf in (90, 3, 55, 12)] + [(500, 400)], "src long, dst long")
    driver: dict = {}
    rounds: dict = {}
    on_driver = sorted(tuple(r) for r in components(edges, stats=driver).collect())
    in_spark = sorted(tuple(r) for r in components(edges, stats=rounds, driver_edges=0).collect())
    assert on_driver == in_spark and len(on_driver) == 41 + 5 + 2
    assert driver == {"edges": 45, "rounds": 0} and rounds["edges"] == 45 and rounds["rounds"] >= 2
    assert components(edges.limit(0)).collect() == []


def test_embedding_clusters_and_density(spark, tmp_path: Path) -> None:  # noqa: F811
    ctx = _ctx(spark, tmp_path)
    result = embedding.run(_docs(spark, tmp_path, known_corpus(), ctx), ctx)
    rows = result.kept.collect()
    assert len({r["emb_cluster"] for r in rows}) == 3
    sizes: dict[int, int] = {}
    for r in rows:
        sizes[r["emb_cluster"]] = sizes.get(r["emb_cluster"], 0) + 1
    for r in rows:
        assert r["emb_density"] == pytest.approx(sizes[r["emb_cluster"]] / (len(rows) / 3))


def test_safety_model_and_blocklist(spark, tmp_path: Path) -> None:  # noqa: F811
    ctx = _ctx(spark, tmp_path, "safety.blocklist=['[unsafe-demo]']")
    records = known_corpus() + [{"id": "marked", "text": known_corpus()[2]["text"] + "\n[unsafe-demo] placeholder"}]
    result = safety.run(_docs(spark, tmp_path, records, ctx), ctx)
    removed = {r["doc_id"]: r["reason"] for r in result.removed.collect()}
    assert set(removed) == {"unsafe", "marked"}
    assert "model" in removed["unsafe"] and "blocklist" in removed["marked"]
    # when safety comes next, the embedding stage's pass judges the texts for it: the same rows, columns and
    # verdicts as its own pass over them
    ctx.following = "safety"
    embedded = embedding.run(_docs(spark, tmp_path, records, ctx), ctx).kept.cache()
    assert {"_safety_score", "_safety_reason"} <= set(embedded.columns)
    carried = safety.run(embedded, ctx)
    alone = safety.run(embedded.drop("_safety_score", "_safety_reason"), ctx)

    def rows(df) -> list[tuple]:
        return sorted(tuple(r) for r in df.collect())

    assert carried.kept.columns == alone.kept.columns and "safety_score" in carried.kept.columns
    assert rows(carried.kept) == rows(alone.kept) and rows(carried.removed) == rows(alone.removed)
    assert {r["doc_id"] for r in carried.removed.collect()} == {"unsafe", "marked"}
    ctx = _ctx(spark, tmp_path, "safety.action=drop_lines")
    kept = {r["doc_id"]: r["text"] for r in safety.run(_docs(spark, tmp_path, records, ctx), ctx).kept.collect()}
    assert UNSAFE_LINE not in kept["unsafe"] and kept["unsafe"].startswith("Mountain villages")


def test_category_and_weighting(spark, tmp_path: Path) -> None:  # noqa: F811
    ctx = _ctx(spark, tmp_path, "category.targets={code: 0.5}", "safety.upsample_sources={books: 3.0}")
    docs = _docs(spark, tmp_path, known_corpus(), ctx)
    categorised = category.run(docs, ctx).kept
    rows = {r["doc_id"]: r["category"] for r in categorised.collect()}
    assert rows["code-a"] == "code" and rows["zh-a"] == "zh" and rows["en-a"] == "en"
    result = weighting.run(categorised, ctx)
    weighted = result.kept.collect()
    tokens = sum(r["ntok"] for r in weighted)
    code_mass = sum(r["weight"] * r["ntok"] for r in weighted if r["category"] == "code")
    assert code_mass / sum(r["weight"] * r["ntok"] for r in weighted) == pytest.approx(0.5)
    assert sum(r["weight"] * r["ntok"] for r in weighted) == pytest.approx(tokens)
    by_id = {r["doc_id"]: r["weight"] for r in weighted}
    assert by_id["en-c"] == pytest.approx(3 * by_id["en-a"])  # books up-sampled, same other factors
