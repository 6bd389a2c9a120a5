"""Near-dedup quality and speed: ``python -m haina.tools.bench.dedup [--docs 6000] [--skip-job]``.

``--docs 10000,50000,200000`` runs each size in turn on its own corpus and ends with a throughput table
(documents/s and the per-document cost in core-milliseconds, wall seconds x cores / documents, of the
MinHash stage on local[2], datasketch on one core, and the whole job), so one can see that the cost per
document stays flat as the corpus grows; ``--set KEY=VALUE`` passes config overrides to both (for
example ``near_dedup.shingle_hash=sha1``, datasketch's own signatures).

The corpus is real English text installed on this machine, nothing generated: Python's reference topics
(``pydoc_data``), standard-library docstrings, the installed distributions' METADATA descriptions and
licence files, then the installed packages' docstrings, cut at paragraph boundaries into documents of
700 - 2,500 characters. That gives some 13,000 documents; larger corpora continue with remixes of their
sentences (paragraphs of two to five real sentences drawn at random, on one line or wrapped), which are
no more alike than the real documents are, and get planted copies the same way. A document is used only if the job's heuristic rules keep it and its Jaccard
with every document chosen before it is below 0.3 (the installed licences repeat one another), so the
only near-duplicates are the planted ones: a fifth of the documents get one to three copies, each with
word edits (replacements by words of the corpus) at a rate that spreads its Jaccard to the original over
0.5 .. 1, and one of five shapes, most of them ones the job's edit stages trim differently in the two
copies:

* ``edit``: word edits alone (line dedup then strips the copy's unedited lines, the original keeps them);
* ``reflow``: the copy's paragraphs laid out anew (one line each, or wrapped at another width), so the
  sentence-quality classifier, which judges the sentences of each line, removes different pieces;
* ``spam``: spam sentences added to some of the copy's lines (the quality classifier removes them);
* ``boilerplate``: navigation and copyright lines added (the C4 line rules remove them);
* ``truncated``: the copy's first or last paragraph dropped.

Ground truth is the exact Jaccard of the raw texts' word 5-gram sets (lower-cased, ``shingles``).

First (unless ``--skip-stage``) the MinHash-LSH stage alone on the raw texts (signatures, banding,
exact verification, connected components, removal of the members within the threshold of their
cluster's representative), on local[2]: document-dedup precision = share of removals whose kept
representative is at J >= threshold, recall = share of the pairs at J >= threshold of which at least one
document was removed; the verified links alone (every pair sharing a band, verified as the stage
verifies), whole clusters (which join pairs through a third document), a recall-by-similarity table
beside the LSH S-curve, the stage's seconds per step (sign, band and verify, connected components,
copies), and throughput beside datasketch's single-process MinHashLSH. The stage runs twice in one new
session and the figures are the second run's, as the stage runs inside the job (after ingest and four
stages have warmed the JVM's JIT, started the Python workers and generated the code of these plans); the
first run's time in the new session is printed beside them (at 50,000 documents about twice as long).

Then (unless ``--skip-job``) the whole ``haina data prepare`` job as the command runs it (local[2],
default config, intermediate stages kept for the diagnostics): precision of the near-dedup removals
against the raw texts' Jaccard to their kept representative; recall over the planted pairs at
J >= threshold, a pair counting as caught when a dedup stage (exact, line or near dedup) removed one of
its documents (pairs of which another stage removed a document are left out and counted); the pairs
that the stages before near-dedup trimmed apart (their texts as near-dedup received them, and as line
dedup received them, below the threshold) and the recall on them; recall by similarity (rows
``J 0.80-0.85 ...``: pairs, share caught, share with a document removed by near, exact and line dedup,
share trimmed apart) and by shape; seconds per stage and each stage's core-milliseconds per document.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import textwrap
import time
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

from pyspark.sql import functions as F

from haina.data_spark import class_archive
from haina.data_spark.config import HeuristicsConfig, load_prepare_config
from haina.data_spark.connected_components import components
from haina.data_spark.installed_text import real_texts
from haina.data_spark.minhash import MinHasher, candidate_probability, lsh_params, shingles
from haina.data_spark.prepare import prepare_main
from haina.data_spark.rules import clean_lines, document_reason
from haina.data_spark.session import get_session
from haina.data_spark.stages.near_dedup import candidate_edges, copies, signatures, verified
from haina.data_spark.text import detect_kind, sentences
from haina.tools.demo.corpus import BOILERPLATE, SPAM_EN

BUCKETS = [(0.5, 0.6), (0.6, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01)]
SHAPES = ("edit", "reflow", "spam", "boilerplate", "truncated")
DEDUP_STAGES = ("exact_dedup", "line_dedup", "near_dedup")
_DOC_CHARS = (700, 2500)
_BASE_MAX_JACCARD = 0.3


def jaccard(a: str, b: str, size: int) -> float:
    x, y = set(shingles(a, size)), set(shingles(b, size))
    return len(x & y) / len(x | y) if x | y else 1.0


# ------------------------------------------------------------------------------------- real text

def _chunks(paragraphs: list[str], rng: random.Random) -> Iterator[str]:
    """Consecutive paragraphs grouped into documents of a random size in ``_DOC_CHARS``."""
    current: list[str] = []
    size, target = 0, rng.randint(*_DOC_CHARS)
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target:
            yield "\n\n".join(current)
            current, size, target = [], 0, rng.randint(*_DOC_CHARS)
    if current and size >= _DOC_CHARS[0]:
        yield "\n\n".join(current)


def base_documents(rng: random.Random, size: int) -> Iterator[str]:
    """Documents of real text: English prose that the job's heuristic rules keep, each with Jaccard
    below ``_BASE_MAX_JACCARD`` to every one given before it (checked exactly)."""
    rules = HeuristicsConfig()
    index: dict[bytes, list[int]] = {}
    sizes: list[int] = []
    for paragraphs in real_texts():
        for text in _chunks(paragraphs, rng):
            if detect_kind(text) != "en" or document_reason(clean_lines(text, "en", rules)[0], "en", rules):
                continue
            grams = set(shingles(text, size))
            if len(grams) < 50:
                continue
            overlap: dict[int, int] = {}
            for gram in grams:
                for other in index.get(gram, ()):
                    overlap[other] = overlap.get(other, 0) + 1
            if any(n / (len(grams) + sizes[o] - n) >= _BASE_MAX_JACCARD for o, n in overlap.items()):
                continue
            for gram in grams:
                index.setdefault(gram, []).append(len(sizes))
            sizes.append(len(grams))
            yield text


# -------------------------------------------------------------------------------------- planting

def _edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """Replace about ``rate`` of the whitespace-separated words by words of the corpus; spacing and
    line layout stay as they were."""
    parts = re.split(r"(\s+)", text)
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    for i in rng.sample(words, min(len(words), round(rate * len(words)))):
        parts[i] = rng.choice(vocab)
    return "".join(parts)


def _reflow(text: str, rng: random.Random) -> str:
    """Every paragraph on one line, or wrapped at another width (only whitespace changes)."""
    width = rng.choice([0, 0, 48, 60, 100])
    out = []
    for paragraph in text.split("\n\n"):
        flat = " ".join(paragraph.split())
        out.append(textwrap.fill(flat, width, break_long_words=False, break_on_hyphens=False) if width else flat)
    return "\n\n".join(out)


def _shape(text: str, shape: str, rng: random.Random, serial: int) -> str:
    if shape == "reflow":
        return _reflow(text, rng)
    lines = text.split("\n")
    if shape == "spam":
        for i in rng.sample(range(len(lines)), max(1, len(lines) // 16)):
            if lines[i].strip():
                lines[i] = f"{lines[i].rstrip()} {rng.choice(SPAM_EN).format(n=serial)}"
        return "\n".join(lines)
    if shape == "boilerplate":
        return "\n".join([BOILERPLATE[0], *lines, rng.choice(BOILERPLATE[1:3])])
    if shape == "truncated":
        paragraphs = text.split("\n\n")
        if len(paragraphs) >= 3:
            return "\n\n".join(paragraphs[1:] if rng.random() < 0.5 else paragraphs[:-1])
    return text


def _remixes(rng: random.Random, pool: list[str]) -> Iterator[str]:
    """Documents of real sentences once the installed text has given every document it has: paragraphs of
    two to five sentences drawn at random from ``pool`` (the sentences of the real documents), on one line
    or wrapped, until the document reaches a random size in ``_DOC_CHARS``. Two of them share a sentence
    rarely and a run of sentences almost never, so, like the real documents, they are not near-duplicates
    of one another."""
    while True:
        target, paragraphs, chars = rng.randint(*_DOC_CHARS), [], 0
        while chars < target:
            flat = " ".join(rng.choice(pool) for _ in range(rng.randint(2, 5)))
            width = rng.choice([0, 0, 60, 72, 80, 100])
            paragraphs.append(textwrap.fill(flat, width, break_long_words=False, break_on_hyphens=False)
                              if width else flat)
            chars += len(flat) + 2
        yield "\n\n".join(paragraphs)


def _documents(rng: random.Random, size: int, pool: list[str]) -> Iterator[tuple[str, bool]]:
    """(text, real): the real documents (:func:`base_documents`), their sentences collected into ``pool``,
    then remixes of those sentences (:func:`_remixes`) for as many more as asked."""
    for text in base_documents(rng, size):
        pool.extend(s for paragraph in text.split("\n\n")
                    for s in sentences(" ".join(paragraph.split())) if len(s.split()) >= 4)
        yield text, True
    for text in _remixes(rng, pool):
        yield text, False


def make_corpus(n: int, seed: int, size: int) -> tuple[list[dict], list[tuple[int, int, float]]]:
    """``n`` documents (id, text, shape) in a shuffled order, and the planted pairs (i, j, exact Jaccard
    of the raw texts): a fifth of the originals get 1 - 3 copies, each of one shape, with word edits at
    rates spread so similarities cover 0.5 .. 1. The installed text gives some 13,000 documents; beyond
    them the originals are remixes of their sentences (:func:`_remixes`), copied the same way."""
    rng = random.Random(seed)
    vocab: list[str] = []  # the distinct words of the originals so far: replacements are real words
    seen: set[str] = set()
    groups: list[list[dict]] = []
    total = real = 0
    pool: list[str] = []
    for text, is_real in _documents(rng, size, pool):
        if total >= n:
            break
        real += is_real
        if is_real:
            for word in re.findall(r"[A-Za-z]{3,12}", text):
                if word not in seen:
                    seen.add(word)
                    vocab.append(word)
        group = [{"text": text, "shape": "original"}]
        if rng.random() < 0.2:
            for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
                shape = rng.choice(SHAPES)
                copy = _shape(_edit(text, rng.uniform(0.0, 0.05), rng, vocab), shape, rng, total)
                group.append({"text": copy, "shape": shape})
        group = group[: n - total]
        groups.append(group)
        total += len(group)
    if real < len(groups):
        print(f"(the installed text gives {real:,} original documents; {len(groups) - real:,} more are remixes "
              "of their sentences)")
    order = list(range(total))
    rng.shuffle(order)  # originals and copies in any order: either may come first in the job
    docs: list[dict] = [{}] * total
    members: list[list[int]] = []
    position = iter(order)
    for group in groups:
        ids = []
        for record in group:
            i = next(position)
            docs[i] = {"id": str(i), **record}
            ids.append(i)
        members.append(ids)
    pairs = [(min(i, j), max(i, j), jaccard(docs[i]["text"], docs[j]["text"], size))
             for ids in members for i, j in combinations(ids, 2)]
    return docs, pairs


# ------------------------------------------------------------------------------ the stage alone

def _stage_steps(df, cfg) -> tuple[object, object, object, set, dict[str, float]]:
    """The MinHash stage's steps on ``df`` (row_id, text), each materialised and timed: (signed, verified
    links, component labels, (component, id) removals, seconds per step and in all). The caller unpersists."""
    seconds: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[name], last = now - last, now

    signed, _, _ = signatures(df, cfg.near_dedup)
    signed = signed.drop("text").cache()  # the texts are signed: what the rest of the stage reads is kept
    signed.count()
    lap("sign")
    edges = verified(candidate_edges(signed), signed, cfg.near_dedup).cache()
    edges.count()
    lap("band+verify")
    labels = components(edges, cfg.near_dedup.max_iterations).cache()
    labels.count()
    lap("components")
    removals = {(r["component"], r["id"]) for r in copies(labels, signed, cfg.near_dedup).collect()}
    lap("copies")
    seconds["total"] = time.perf_counter() - start
    return signed, edges, labels, removals, seconds


def spark_minhash(docs: list[dict], cfg, wanted: set[int]) -> tuple[set, set, set, dict[int, set], dict[str, float], float]:
    """(verified links, pairs in one final cluster, (kept, removed) pairs, band keys of the ``wanted``
    documents, seconds per step of the stage and in all, seconds of the stage's first run).

    The stage runs twice: first in this new session (the JVM's JIT, Python workers, code generation of
    each plan), then again, timed for the figures, in the warm session, as it runs inside the job after
    ingest and four stages; both times are reported."""
    spark = get_session(cfg.spark, "local[2]", len(_jsonl(docs)))  # the JIT the whole job's input gets
    df = spark.createDataFrame([(int(d["id"]), d["text"]) for d in docs], "row_id long, text string").repartition(8)
    df = df.cache()
    df.count()
    first = _stage_steps(df, cfg)
    for frame in first[:3]:
        frame.unpersist()
    signed, edges, labels, removals, seconds = _stage_steps(df, cfg)
    assert removals == first[3], "the stage's two runs removed different documents"
    # The stage links each bucket member to the bucket's smallest id only (enough for the components);
    # a pair's own link is every pair sharing a bucket, verified the stage's way.
    bands = signed.select("row_id", F.posexplode("_bands").alias("band", "key"))
    candidates = (bands.alias("a").join(bands.alias("b"), ["band", "key"])
                  .filter(F.col("a.row_id") < F.col("b.row_id"))
                  .select(F.col("a.row_id").alias("src"), F.col("b.row_id").alias("dst")).distinct())
    links = {(r["src"], r["dst"]) for r in verified(candidates, signed, cfg.near_dedup).collect()}
    members: dict[int, list[int]] = {}
    for row in labels.collect():
        members.setdefault(row["component"], []).append(row["id"])
    clustered = {tuple(sorted(p)) for group in members.values() for p in combinations(group, 2)}
    keys = {r["row_id"]: {(b, k) for b, k in enumerate(r["_bands"] or [])}
            for r in signed.select("row_id", "_bands").toLocalIterator() if r["row_id"] in wanted}
    for frame in (signed, edges, labels, df):
        frame.unpersist()
    return links, clustered, removals, keys, seconds, first[4]["total"]


def _precision_recall(found: set, truth: set, similarity: dict, threshold: float) -> tuple[float, float]:
    """A found pair outside the planted groups is two unrelated texts (J < 0.3): a false positive."""
    hits = found & truth
    false = [p for p in found if similarity.get(p, 0.0) < threshold]
    return len(hits) / max(1, len(hits) + len(false)), len(hits) / max(1, len(truth))


def datasketch_lsh(docs: list[dict], cfg) -> float:
    """Seconds for datasketch's MinHashLSH to sign, query and insert every document in one process."""
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


# -------------------------------------------------------------------------------- the whole job

def _stage_texts(out: Path, stage: str) -> dict[int, str]:
    """Document id -> text as ``stage`` received it: the newest stage folder before ``stage``'s."""
    import pyarrow.parquet as pq

    folders = sorted(p for p in (out / "stages").iterdir() if p.is_dir())
    index = next(i for i, p in enumerate(folders) if p.name.endswith(f"_{stage}"))
    table = pq.read_table(folders[index - 1], columns=["doc_id", "text"])
    return dict(zip(map(int, table.column("doc_id").to_pylist()), table.column("text").to_pylist(), strict=True))


def _jsonl(docs: list[dict]) -> str:
    """The job's input: one JSON line per document (ASCII: a character per byte)."""
    return "".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs)


def whole_job(docs: list[dict], folder: Path, overrides: list[str] = ()) -> tuple[dict, float]:
    """Run ``haina data prepare`` on ``docs``; the job's outcome per document and its seconds."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    path = folder / "docs.jsonl"
    path.write_text(_jsonl(docs), encoding="ascii")
    out = folder / "out"
    start = time.perf_counter()
    prepare_main([path], out, master="local[2]", progress=False, overrides=["keep_intermediate=true", *overrides])
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    removed = ds.dataset(out / "removed", format="parquet", partitioning="hive").to_table(
        columns=["row_id", "doc_id", "stage", "dup_of"]).to_pylist()
    kept = pq.read_table(out / "kept", columns=["row_id", "doc_id"]).to_pylist()
    doc_of = {r["row_id"]: int(r["doc_id"]) for r in removed + kept}
    outcome = {
        "report": report,
        "stage": {int(r["doc_id"]): r["stage"] for r in removed},
        "dup_of": {int(r["doc_id"]): doc_of[r["dup_of"]] for r in removed if r["dup_of"] is not None},
        "before_near_dedup": _stage_texts(out, "near_dedup"),
        "before_line_dedup": _stage_texts(out, "line_dedup"),
    }
    return outcome, seconds


def report_job(docs: list[dict], pairs: list[tuple[int, int, float]], outcome: dict, threshold: float, size: int) -> None:
    stage, dup_of, before = outcome["stage"], outcome["dup_of"], outcome["before_near_dedup"]
    report = outcome["report"]
    print(f"documents per stage (seconds): ingest {report['ingest']['documents']:,} ({report['ingest']['seconds']:.1f}), " + ", ".join(
        f"{row['stage']} {row['docs_in']:,}->{row['docs_out']:,} ({row['seconds']:.1f})"
        for row in report["stages"] if "docs_in" in row))
    near = [(doc, rep) for doc, rep in dup_of.items() if stage[doc] == "near_dedup"]
    right = sum(jaccard(docs[doc]["text"], docs[rep]["text"], size) >= threshold for doc, rep in near)
    counted, left_out = [], 0
    for i, j, sim in pairs:
        others = {stage.get(i), stage.get(j)} - {None, *DEDUP_STAGES}
        if others:
            left_out += sim >= threshold
        else:
            counted.append((i, j, sim))
    caught = {(i, j): stage.get(i) in DEDUP_STAGES or stage.get(j) in DEDUP_STAGES for i, j, _ in counted}
    truth = [(i, j) for i, j, sim in counted if sim >= threshold]
    recall = sum(caught[p] for p in truth) / max(1, len(truth))
    print(f"{'job dedup':<15} precision {right / max(1, len(near)):.4f}  recall {recall:.4f}  "
          f"({len(near):,} removed by near-dedup; {len(truth):,} pairs with J >= {threshold}, "
          f"{left_out:,} more left out: another stage removed a document)")
    apart = {(i, j): jaccard(before[i], before[j], size) < threshold
             for i, j in truth if i in before and j in before}
    trimmed = [p for p, is_apart in apart.items() if is_apart]
    early = outcome["before_line_dedup"]
    early_apart = [(i, j) for i, j in apart if jaccard(early[i], early[j], size) < threshold]
    print(f"trimmed apart before near-dedup: {len(trimmed):,} of the {len(apart):,} pairs at J >= {threshold} that "
          f"reached it, {len(early_apart):,} of them already before line dedup; recall on them "
          f"{sum(caught[p] for p in trimmed) / max(1, len(trimmed)):.4f} and "
          f"{sum(caught[p] for p in early_apart) / max(1, len(early_apart)):.4f}")
    print(f"{'raw Jaccard':>13} {'pairs':>6} {'caught':>7} {'near':>6} {'exact':>6} {'line':>6} {'apart':>6}")
    for low, high in BUCKETS:
        inside = [(i, j) for i, j, sim in counted if low <= sim < high]
        if not inside:
            continue

        def share(pred, inside=inside) -> float:
            return sum(pred(i, j) for i, j in inside) / len(inside)

        by = {name: share(lambda i, j, name=name: name in (stage.get(i), stage.get(j))) for name in DEDUP_STAGES}
        reached = [(i, j) for i, j in inside if i in before and j in before]
        apart_share = sum(jaccard(before[i], before[j], size) < threshold for i, j in reached) / max(1, len(reached))
        print(f"J {low:>4.2f}-{min(high, 1.0):<5.2f} {len(inside):>6} {share(lambda i, j: caught[(i, j)]):>7.3f} "
              f"{by['near_dedup']:>6.3f} {by['exact_dedup']:>6.3f} {by['line_dedup']:>6.3f} {apart_share:>6.3f}")
    shapes = {}
    for i, j in truth:
        names = sorted({docs[i]["shape"], docs[j]["shape"]} - {"original"})
        shapes.setdefault(names[0] if len(names) == 1 else "two copies", []).append(caught[(i, j)])
    print(f"recall by shape at J >= {threshold}: " + ", ".join(
        f"{name} {sum(v) / len(v):.3f} ({len(v)})" for name, v in sorted(shapes.items())))


def core_ms(seconds: float, cores: int, docs: int) -> float:
    """The per-document cost: wall seconds times the cores that ran them, per document, in milliseconds."""
    return 1000.0 * seconds * cores / max(1, docs)


def stage_alone(docs: list[dict], pairs: list[tuple[int, int, float]], cfg, bands: int, rows: int) -> dict[str, float]:
    nd = cfg.near_dedup
    wanted = {i for i, j, _ in pairs} | {j for _, j, _ in pairs}
    links, clustered, removals, keys, laps, cold_s = spark_minhash(docs, cfg, wanted)
    spark_s = laps["total"]
    truth = {(i, j) for i, j, sim in pairs if sim >= nd.threshold}
    true_sim = {(i, j): sim for i, j, sim in pairs}
    right = sum(true_sim.get((min(p), max(p)), 0.0) >= nd.threshold for p in removals)
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
    n = len(docs)
    print(f"MinHash stage seconds ({nd.shingle_hash} shingle hash): " + ", ".join(
        f"{name} {sec:.2f}" for name, sec in laps.items() if name != "total"))
    print(f"Spark MinHash stage (local[2]): {n / spark_s:,.0f} docs/s ({spark_s:.1f} s, "
          f"{core_ms(spark_s, 2, n):.3f} core-ms/doc) in a warm session; its first run in a new session "
          f"{cold_s:.1f} s ({n / cold_s:,.0f} docs/s)", flush=True)
    ds = datasketch_lsh(docs, cfg)
    print(f"datasketch MinHashLSH (1 process): {n / ds:,.0f} docs/s ({ds:.1f} s, {core_ms(ds, 1, n):.3f} core-ms/doc); "
          f"Spark stage {ds / spark_s:.2f}x its speed warm, {ds / cold_s:.2f}x in a new session", flush=True)
    return {"stage_s": spark_s, "cold_s": cold_s, "datasketch_s": ds}


def job_seconds(report: dict, docs: int) -> None:
    """Seconds per stage of the job and each stage's cost per document (core-ms on local[2])."""
    rows = [("ingest", report["ingest"]["seconds"])] + [
        (row["stage"], row["seconds"]) for row in report["stages"] if "seconds" in row]
    print("job stage seconds (core-ms/doc): " + ", ".join(
        f"{name} {sec:.1f} ({core_ms(sec, 2, docs):.2f})" for name, sec in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="6000",
                        help="documents, originals and copies; a comma-separated list runs each size in turn "
                             "(e.g. 10000,50000,200000) and ends with a throughput table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-job", action="store_true", help="skip the whole prepare job")
    parser.add_argument("--skip-stage", action="store_true", help="skip the MinHash stage alone and datasketch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both the stage alone and the job (e.g. near_dedup.shingle_hash=sha1)")
    args = parser.parse_args(argv)
    try:
        sizes = [int(x) for x in str(args.docs).split(",") if x.strip()]
    except ValueError:
        parser.error(f"--docs {args.docs!r}: expected a number or a comma-separated list of numbers")
    if not sizes or min(sizes) < 1:
        parser.error("--docs: sizes must be positive")
    cfg = load_prepare_config(None, args.set)
    nd = cfg.near_dedup
    bands, rows = lsh_params(nd.lsh_threshold, nd.num_perm, nd.false_positive_weight, nd.false_negative_weight)
    MinHasher.create(nd.num_perm, nd.seed, nd.scheme)
    archive = class_archive.existing()
    print(f"local JVM class archive: {archive or 'none (python -m haina.data_spark.write_class_archive writes it)'}")
    table = []
    for n in sizes:
        started = time.perf_counter()
        docs, pairs = make_corpus(n, args.seed, nd.shingle_size)
        print(f"{len(docs):,} documents, {len(pairs):,} planted pairs; LSH {bands} bands x {rows} rows, "
              f"threshold {nd.threshold} (corpus built in {time.perf_counter() - started:.1f} s)", flush=True)
        row: dict[str, float] = {"docs": len(docs)}
        if not args.skip_stage:
            row |= stage_alone(docs, pairs, cfg, bands, rows)
        if not args.skip_job:
            with tempfile.TemporaryDirectory() as tmp:
                outcome, job = whole_job(docs, Path(tmp), args.set)
            row["job_s"] = job
            print(f"whole prepare job (local[2]): {len(docs) / job:,.0f} docs/s ({job:.1f} s, "
                  f"{core_ms(job, 2, len(docs)):.2f} core-ms/doc)")
            job_seconds(outcome["report"], len(docs))
            report_job(docs, pairs, outcome, nd.threshold, nd.shingle_size)
        table.append(row)
    if len(table) > 1:
        print("throughput (core-ms/doc = wall seconds x cores / documents; Spark on local[2], datasketch on 1 core)")
        print(f"{'documents':>10} {'stage docs/s':>13} {'core-ms':>8} {'datasketch':>11} {'core-ms':>8} "
              f"{'ratio':>6} {'new-session ratio':>17} {'job docs/s':>11} {'core-ms':>8}")
        for row in table:
            n = int(row["docs"])
            cells = [f"{n:>10,}"]
            if "stage_s" in row:
                cells += [f"{n / row['stage_s']:>13,.0f}", f"{core_ms(row['stage_s'], 2, n):>8.3f}",
                          f"{n / row['datasketch_s']:>11,.0f}", f"{core_ms(row['datasketch_s'], 1, n):>8.3f}",
                          f"{row['datasketch_s'] / row['stage_s']:>6.2f}", f"{row['datasketch_s'] / row['cold_s']:>17.2f}"]
            else:
                cells += [f"{'-':>13} {'-':>8} {'-':>11} {'-':>8} {'-':>6} {'-':>17}"]
            if "job_s" in row:
                cells += [f"{n / row['job_s']:>11,.0f}", f"{core_ms(row['job_s'], 2, n):>8.2f}"]
            print(" ".join(cells))


if __name__ == "__main__":
    main()
