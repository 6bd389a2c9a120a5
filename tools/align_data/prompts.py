"""``haina prompts``: a prompt set organised by a three-level taxonomy, as the report's reward-model data is.

- **assign** each prompt a leaf category: from its own ``category`` field (``given``), from the
  taxonomy's keywords (``rules``: a leaf's name and keywords, the most matches win), or with a
  classifier trained on labelled prompts (``classifier``: multinomial naive Bayes on hashed word and
  character n-grams, which needs no vocabulary and handles Chinese and English alike);
- **coverage** per level: counts, shares, the categories below a minimum, and a diversity measure per
  leaf (distinct bigrams over all bigrams, and the spread of hashed-n-gram embeddings: mean cosine
  distance to the category's centroid; 0 when every prompt is the same);
- **sample** stratified: categories with the fewest picks are filled first (water filling), so a
  budget of n prompts covers as many categories as evenly as the pool allows.

The taxonomy file is YAML ``{top: {middle: [leaf, ...]}}``; a leaf may also be a mapping
``{name, description, keywords}``.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from haina.core.errors import ConfigError
from haina.core.files import read_jsonl
from haina.data_spark.features import embed, featurize, projection
from haina.data_spark.text import tokens
from haina.plugins.align.taxonomy import (
    Taxonomy,
    category_path,
    leaf_keywords,
    level_counts,
    level_keys,
    load_taxonomy,
    validate_path,
)

FEATURES = 2**18
EMBED_DIM = 64


def prompt_text(item: dict[str, Any]) -> str:
    """The user turns of a prompt (a string, or a list of chat messages)."""
    prompt = item.get("prompt", item.get("text", ""))
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict) and m.get("role") != "assistant")


def leaves(taxonomy: Taxonomy) -> list[str]:
    return level_keys(taxonomy)[2]


# --- assignment ---------------------------------------------------------------------------------------


def assign_by_rules(items: list[dict[str, Any]], taxonomy: Taxonomy, keywords: dict[str, list[str]]) -> int:
    """Set ``category`` to the leaf whose keywords (and name) occur most often in the prompt; returns how
    many prompts matched no leaf (they keep no category)."""
    unmatched = 0
    for item in items:
        text = prompt_text(item).lower()
        best, hits = None, 0
        for leaf in leaves(taxonomy):
            words = [leaf.rsplit("/", 1)[1].replace("_", " "), *keywords.get(leaf, [])]
            count = sum(text.count(w.lower()) for w in words if w)
            if count > hits:
                best, hits = leaf, count
        if best is None:
            unmatched += 1
            item.pop("category", None)
        else:
            item["category"] = best.split("/")
    return unmatched


@dataclass
class NaiveBayes:
    """Multinomial naive Bayes over hashed n-grams with add-one smoothing."""

    classes: list[str] = field(default_factory=list)
    log_prior: np.ndarray | None = None
    log_likelihood: np.ndarray | None = None  # [classes, FEATURES]

    @staticmethod
    def features(text: str) -> tuple[np.ndarray, np.ndarray]:
        return featurize(text, FEATURES)

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> NaiveBayes:
        if not texts:
            raise ConfigError("the classifier needs labelled prompts (--labelled FILE with category fields)")
        self.classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(self.classes)}
        counts = np.ones((len(self.classes), FEATURES), dtype=np.float64)
        prior = np.zeros(len(self.classes))
        for text, label in zip(texts, labels, strict=True):
            ids, values = self.features(text)
            counts[index[label], ids] += values
            prior[index[label]] += 1
        self.log_prior = np.log(prior / prior.sum())
        self.log_likelihood = np.log(counts / counts.sum(1, keepdims=True))
        return self

    def predict(self, text: str) -> str:
        assert self.log_prior is not None and self.log_likelihood is not None
        ids, values = self.features(text)
        scores = self.log_prior + self.log_likelihood[:, ids] @ values
        return self.classes[int(np.argmax(scores))]


def assign_by_classifier(items: list[dict[str, Any]], labelled: list[dict[str, Any]], taxonomy: Taxonomy) -> None:
    good = [it for it in labelled if validate_path(category_path(it), taxonomy) and len(category_path(it)) == 3]
    model = NaiveBayes().fit([prompt_text(it) for it in good], ["/".join(category_path(it)) for it in good])
    for item in items:
        item["category"] = model.predict(prompt_text(item)).split("/")


def assign(
    items: list[dict[str, Any]], taxonomy: Taxonomy, method: str, keywords: dict[str, list[str]],
    labelled: list[dict[str, Any]] | None = None,
) -> None:
    if method == "given":
        return
    if method == "rules":
        assign_by_rules(items, taxonomy, keywords)
    elif method == "classifier":
        assign_by_classifier(items, labelled or [], taxonomy)
    else:
        raise ConfigError(f"--assign {method!r}: use given, rules or classifier")


# --- coverage and diversity ---------------------------------------------------------------------------


def distinct_2(texts: Sequence[str]) -> float:
    """Distinct bigrams / all bigrams over the texts (words, CJK characters); 1 = no bigram repeats."""
    grams = [(a, b) for t in texts for a, b in zip(tokens(t), tokens(t)[1:], strict=False)]
    return len(set(grams)) / len(grams) if grams else 0.0


def embedding_spread(texts: Sequence[str], matrix: np.ndarray) -> float:
    """Mean cosine distance of the texts' embeddings to their centroid (0 when all are alike)."""
    if len(texts) < 2:
        return 0.0
    vectors = np.stack([embed(t, matrix) for t in texts])
    centroid = vectors.mean(0)
    norm = float(np.linalg.norm(centroid))
    if norm == 0:
        return 1.0
    return float(np.mean(1.0 - vectors @ (centroid / norm)))


def coverage(items: list[dict[str, Any]], taxonomy: Taxonomy, min_count: int) -> dict[str, Any]:
    """Counts and shares per level, the categories below ``min_count``, diversity per covered leaf."""
    counts, unknown = level_counts(items, taxonomy)
    every = level_keys(taxonomy)
    by_leaf: dict[str, list[str]] = defaultdict(list)
    for item in items:
        path = category_path(item)
        if len(path) == 3 and validate_path(path, taxonomy):
            by_leaf["/".join(path)].append(prompt_text(item))
    known = max(1, len(items) - unknown)
    matrix = projection(FEATURES, EMBED_DIM, seed=0)
    levels = []
    for level, keys in enumerate(every):
        rows = {k: {"count": counts[level][k], "share": counts[level][k] / known} for k in keys}
        levels.append({
            "categories": len(keys),
            "covered": sum(1 for k in keys if counts[level][k]),
            "below_minimum": [k for k in keys if counts[level][k] < min_count],
            "rows": rows,
        })
    diversity = {
        leaf: {"prompts": len(texts), "distinct_2": distinct_2(texts), "embedding_spread": embedding_spread(texts, matrix)}
        for leaf, texts in sorted(by_leaf.items())
    }
    return {"prompts": len(items), "unknown_category": unknown, "min_count": min_count, "levels": levels,
            "diversity": diversity}


def format_coverage_report(report: dict[str, Any]) -> str:
    names = ("top", "middle", "leaf")
    lines = [f"{report['prompts']} prompts, {report['unknown_category']} without a known category; "
             f"minimum {report['min_count']} per category"]
    for name, level in zip(names, report["levels"], strict=True):
        lines.append(f"{name:<7} covered {level['covered']}/{level['categories']}, "
                     f"{len(level['below_minimum'])} below the minimum")
    lines.append(f"{'top category':<16} {'prompts':>7} {'share':>7}")
    for key, row in report["levels"][0]["rows"].items():
        lines.append(f"{key:<16} {row['count']:>7} {row['share']:>7.1%}")
    lines.append(f"{'leaf category':<36} {'prompts':>7} {'distinct-2':>10} {'spread':>7}")
    for leaf, row in report["diversity"].items():
        lines.append(f"{leaf:<36} {row['prompts']:>7} {row['distinct_2']:>10.3f} {row['embedding_spread']:>7.3f}")
    return "\n".join(lines)


# --- stratified sampling ------------------------------------------------------------------------------


def stratified_sample(
    items: list[dict[str, Any]], n: int, seed: int, taxonomy: Taxonomy, already: Counter[str] | None = None
) -> list[dict[str, Any]]:
    """Up to ``n`` prompts, one at a time from the category with the fewest picks so far (counting
    ``already`` chosen ones), ties by name; prompts without a known category come last."""
    rng = random.Random(seed)
    pools: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        path = category_path(item)
        pools["/".join(path) if validate_path(path, taxonomy) else "~uncategorized"].append(item)
    for pool in pools.values():
        rng.shuffle(pool)
    picks = Counter(already or {})
    chosen: list[dict[str, Any]] = []
    while len(chosen) < n:
        open_pools = [k for k in sorted(pools) if pools[k] and k != "~uncategorized"] or [
            k for k in pools if pools[k]
        ]
        if not open_pools:
            break
        key = min(open_pools, key=lambda k: (picks[k], k))
        chosen.append(pools[key].pop())
        picks[key] += 1
    return chosen


# --- command ------------------------------------------------------------------------------------------


def read_items(path: str | Path) -> list[dict[str, Any]]:
    return [item for _, item in read_jsonl(path)]


def run_prompts(args: Any) -> int:
    """``haina prompts --prompts FILE [--taxonomy FILE] [--assign ...] [--sample N --out FILE]``."""
    taxonomy = load_taxonomy(args.taxonomy)
    items = read_items(args.prompts)
    labelled = read_items(args.labelled) if args.labelled else None
    assign(items, taxonomy, args.assign, leaf_keywords(args.taxonomy), labelled)
    report = coverage(items, taxonomy, args.min_count)
    print(format_coverage_report(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"coverage report written to {args.report}")
    if args.sample is not None:
        if not args.out:
            raise ConfigError("--sample needs --out FILE")
        picked = stratified_sample(items, args.sample, args.seed, taxonomy)
        with Path(args.out).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in picked)
        spread = Counter("/".join(category_path(it)) for it in picked)
        print(f"{len(picked)} prompts from {len(spread)} categories written to {args.out} "
              f"(per category: {min(spread.values(), default=0)}..{max(spread.values(), default=0)})")
    return 0

