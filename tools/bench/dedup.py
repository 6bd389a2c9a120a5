"""Near-dedup quality and speed: ``python -m haina.tools.bench.dedup [--docs 50000]``.

Generates random-word documents and plants edited copies at chosen Jaccard similarities, runs the Spark
MinHash-LSH stage (signatures, banding, exact verification, connected components, removal of the members
within the threshold of their cluster's representative) on local[2], and prints document-dedup precision
and recall against exact Jaccard ground truth: precision = share of removals whose kept representative is
at J >= threshold, recall = share of the pairs at J >= threshold of which at least one document was
removed (the pair no longer trains twice). Diagnostics follow: the verified links alone, whole clusters
(which join pairs through a third document), a recall-by-similarity table beside the LSH S-curve, and
throughput: the MinHash stage alone, the whole ``haina data prepare`` job, and datasketch's
single-process MinHashLSH on the same documents.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from itertools import combinations
from pathlib import Path

from haina.data_spark.config import load_prepare_config
from haina.data_spark.connected_components import connected_components
from haina.data_spark.minhash import MinHasher, candidate_probability, lsh_params, shingles
from haina.data_spark.prepare import prepare_main
from haina.data_spark.session import get_session
from haina.data_spark.stages.near_dedup import candidate_edges, copies, signatures, verified

BUCKETS = [(0.5, 0.6), (0.6, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01)]


def jaccard(a: str, b: str, size: int) -> float:
    x, y = set(shingles(a, size)), set(shingles(b, size))
    return len(x & y) / len(x | y) if x | y else 1.0


def _edit(words: list[str], fraction: float, rng: random.Random, vocab: list[str]) -> list[str]:
    out = list(words)
    for pos in rng.sample(range(len(out)), max(1, int(fraction * len(out)))):
        out[pos] = rng.choice(vocab)
    return out


STOP_WORDS = ("the", "of", "and", "to", "in", "that", "with", "is")


def _prose(rng: random.Random, vocab: list[str], length: int) -> list[str]:
    """Sentence-shaped pseudo-words: stop words among them, a capital first word, a final period, so
    the whole job's Gopher and C4 rules keep the documents (random tokens alone fail them all)."""
    words: list[str] = []
    while len(words) < length:
        sentence = [rng.choice(STOP_WORDS) if rng.random() < 0.3 else rng.choice(vocab) for _ in range(rng.randint(8, 16))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words += sentence
    return words


def make_corpus(n: int, seed: int, size: int) -> tuple[list[dict], list[tuple[int, int, float]]]:
    """Documents (id, text) and the planted pairs (i, j, exact Jaccard); a fifth of the documents are
    edited copies (1 - 3 per original) with edit rates spread so similarities cover 0.5 .. 1."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(20000)]
    docs: list[dict] = []
    groups: list[list[int]] = []
    while len(docs) < n:
        words = _prose(rng, vocab, rng.randint(150, 300))
        group = [len(docs)]
        docs.append({"id": str(len(docs)), "text": " ".join(words)})
        if rng.random() < 0.1:
            for _ in range(rng.randint(1, 3)):
                if len(docs) >= n:
                    break
                fraction = rng.uniform(0.0, 0.12)  # word edits; each edit breaks up to `size` shingles
                group.append(len(docs))
                docs.append({"id": str(len(docs)), "text": " ".join(_edit(words, fraction, rng, vocab))})
        groups.append(group)
    pairs = [(i, j, jaccard(docs[i]["text"], docs[j]["text"], size)) for g in groups for i, j in combinations(g, 2)]
    return docs, pairs


def spark_minhash(docs: list[dict], cfg) -> tuple[set, set, set, dict[int, set], float]:
    """(verified links, pairs in one final cluster, (kept, removed) pairs, band keys per document, seconds)."""
    spark = get_session(cfg.spark, "local[2]")
    df = spark.createDataFrame([(int(d["id"]), d["text"]) for d in docs], "row_id long, text string").repartition(8)
    df = df.cache()
    df.count()
    start = time.perf_counter()
    signed, _, _ = signatures(df, cfg.near_dedup)
    signed = signed.cache()
    edges = verified(candidate_edges(signed), signed, cfg.near_dedup).cache()
    labels = connected_components(edges, cfg.near_dedup.max_iterations).cache()
    removals = {(r["component"], r["id"]) for r in copies(labels, signed, cfg.near_dedup).collect()}
    seconds = time.perf_counter() - start
    links = {(min(r["src"], r["dst"]), max(r["src"], r["dst"])) for r in edges.collect()}
    members: dict[int, list[int]] = {}
    for row in labels.collect():
        members.setdefault(row["component"], []).append(row["id"])
    clustered = {tuple(sorted(p)) for group in members.values() for p in combinations(group, 2)}
    keys = {r["row_id"]: {(b, k) for b, k in enumerate(r["_bands"] or [])} for r in signed.select("row_id", "_bands").collect()}
    signed.unpersist()
    df.unpersist()
    return links, clustered, removals, keys, seconds


def _precision_recall(found: set, truth: set, similarity: dict, threshold: float) -> tuple[float, float]:
    """A found pair outside the planted groups is two random texts (J ~ 0): a false positive."""
    hits = found & truth
    false = [p for p in found if similarity.get(p, 0.0) < threshold]
    return len(hits) / max(1, len(hits) + len(false)), len(hits) / max(1, len(truth))


def datasketch_lsh(docs: list[dict], cfg) -> float:
    from datasketch import MinHash, MinHashLSH

    nd = cfg.near_dedup
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=nd.lsh_threshold, num_perm=nd.num_perm)
    for d in docs:
        m = MinHash(num_perm=nd.num_perm, seed=nd.seed)
        m.update_batch(shingles(d["text"], nd.shingle_size))
        lsh.query(m)
        lsh.insert(d["id"], m)
    return time.perf_counter() - start


def whole_job(docs: list[dict], folder: Path) -> float:
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    start = time.perf_counter()
    prepare_main([path], folder / "out", master="local[2]", progress=False,
                 overrides=["heuristics.en.min_words=20"])
    seconds = time.perf_counter() - start
    report = json.loads((folder / "out" / "report.json").read_text())
    print("whole job, documents per stage: " + ", ".join(
        f"{row['stage']} {row['docs_in']:,}->{row['docs_out']:,}" for row in report["stages"]))
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-job", action="store_true", help="skip timing the whole prepare job")
    args = parser.parse_args(argv)
    cfg = load_prepare_config(None, [])
    nd = cfg.near_dedup
    docs, pairs = make_corpus(args.docs, args.seed, nd.shingle_size)
    bands, rows = lsh_params(nd.lsh_threshold, nd.num_perm, nd.false_positive_weight, nd.false_negative_weight)
    MinHasher.create(nd.num_perm, nd.seed, nd.scheme)
    print(f"{len(docs):,} documents, {len(pairs):,} planted pairs; LSH {bands} bands x {rows} rows, "
          f"threshold {nd.threshold}", flush=True)

    links, clustered, removals, keys, spark_s = spark_minhash(docs, cfg)
    truth = {(i, j) for i, j, sim in pairs if sim >= nd.threshold}
    true_sim = {(i, j): sim for i, j, sim in pairs}
    right = sum(true_sim.get(p, 0.0) >= nd.threshold for p in removals)
    gone = {m for _, m in removals}
    broken = sum(i in gone or j in gone for i, j in truth)
    print(f"{'document dedup':<15} precision {right / max(1, len(removals)):.4f}  recall "
          f"{broken / max(1, len(truth)):.4f}  ({len(removals):,} removed; {len(truth):,} pairs with J >= {nd.threshold})")
    for name, found in (("verified links", links), ("same cluster", clustered)):
        precision, recall = _precision_recall(found, truth, true_sim, nd.threshold)
        print(f"{name:<15} precision {precision:.4f}  recall {recall:.4f}")
    print(f"{'Jaccard':>11} {'pairs':>7} {'share band':>11} {'S-curve':>8} {'linked':>7}")
    for low, high in BUCKETS:
        inside = [(i, j) for i, j, sim in pairs if low <= sim < high]
        if not inside:
            continue
        banded = sum(bool(keys[i] & keys[j]) for i, j in inside) / len(inside)
        linked = sum(p in links for p in inside) / len(inside)
        mid = (low + min(high, 1.0)) / 2
        print(f"{low:>5.2f}-{min(high, 1.0):<5.2f} {len(inside):>7} {banded:>11.3f} "
              f"{candidate_probability(mid, bands, rows):>8.3f} {linked:>7.3f}")
    print(f"Spark MinHash stage (local[2]): {len(docs) / spark_s:,.0f} docs/s ({spark_s:.1f} s)", flush=True)
    ds = datasketch_lsh(docs, cfg)
    print(f"datasketch MinHashLSH (1 process): {len(docs) / ds:,.0f} docs/s ({ds:.1f} s)", flush=True)
    if not args.skip_job:
        with tempfile.TemporaryDirectory() as tmp:
            job = whole_job(docs, Path(tmp))
        print(f"whole prepare job (local[2]): {len(docs) / job:,.0f} docs/s ({job:.1f} s)")


if __name__ == "__main__":
    main()
