"""A three-level prompt taxonomy (the report organises RM prompts as 6 / 30 / 200+ categories) and the
coverage of a prompt set over it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from haina.core.errors import InputFileError
from haina.core.files import read_yaml

Taxonomy = dict[str, dict[str, list[str]]]

DEFAULT_TAXONOMY: Taxonomy = {
    "math": {"arithmetic": ["addition", "subtraction", "multiplication"], "word_problems": ["money", "time"]},
    "text": {"transform": ["reverse", "uppercase", "count_letters"], "writing": ["summary", "rewrite"]},
    "knowledge": {"science": ["physics", "biology"], "history": ["ancient", "modern"]},
    "code": {"python": ["debugging", "explanation"], "sql": ["queries"]},
    "safety": {"harmful": ["violence", "illegal"], "privacy": ["personal_data"]},
    "chat": {"daily": ["greeting", "advice"], "roleplay": ["characters"]},
}


def _read_file(path: str | Path) -> dict[str, Any]:
    data = read_yaml(path, what="taxonomy file")
    if not all(
        isinstance(mid, dict) and all(isinstance(leaves, list) for leaves in mid.values()) for mid in data.values()
    ):
        raise InputFileError(f"{path}: a taxonomy is a mapping top -> mapping middle -> list of leaf categories")
    for mids in data.values():
        for leaves in mids.values():
            for leaf in leaves:
                if not isinstance(leaf, str) and not (isinstance(leaf, dict) and isinstance(leaf.get("name"), str)):
                    raise InputFileError(f"{path}: leaf {leaf!r} is neither a name nor a mapping with a name")
    return data


def _leaf_name(leaf: str | dict[str, Any]) -> str:
    return leaf if isinstance(leaf, str) else leaf["name"]


def load_taxonomy(path: str | Path | None) -> Taxonomy:
    """The YAML taxonomy at ``path`` ({top: {middle: [leaf, ...]}}; a leaf is a name or a mapping with
    ``name``, ``description`` and ``keywords``) or the built-in default, as names only."""
    if path is None:
        return DEFAULT_TAXONOMY
    data = _read_file(path)
    return {top: {mid: [_leaf_name(leaf) for leaf in leaves] for mid, leaves in mids.items()} for top, mids in data.items()}


def leaf_keywords(path: str | Path | None) -> dict[str, list[str]]:
    """``{"top/middle/leaf": [keyword, ...]}`` of the leaves that list keywords (none for the default)."""
    if path is None:
        return {}
    out: dict[str, list[str]] = {}
    for top, mids in _read_file(path).items():
        for mid, leaves in mids.items():
            for leaf in leaves:
                if isinstance(leaf, dict) and leaf.get("keywords"):
                    out[f"{top}/{mid}/{leaf['name']}"] = [str(k) for k in leaf["keywords"]]
    return out


def category_path(item: dict[str, Any]) -> list[str]:
    path = item.get("category") or []
    return path.split("/") if isinstance(path, str) else list(path)


def validate_path(path: list[str], taxonomy: Taxonomy) -> bool:
    """Whether the path names an existing top / middle / leaf chain (prefixes count)."""
    if not path or path[0] not in taxonomy:
        return False
    if len(path) > 1 and path[1] not in taxonomy[path[0]]:
        return False
    return len(path) <= 2 or path[2] in taxonomy[path[0]][path[1]]


def level_keys(taxonomy: Taxonomy) -> list[list[str]]:
    """Every category path of each level: ["top"], ["top/middle"], ["top/middle/leaf"]."""
    return [
        list(taxonomy),
        [f"{top}/{mid}" for top, mids in taxonomy.items() for mid in mids],
        [f"{top}/{mid}/{leaf}" for top, mids in taxonomy.items() for mid, leaves in mids.items() for leaf in leaves],
    ]


def level_counts(items: list[dict[str, Any]], taxonomy: Taxonomy) -> tuple[list[Counter[str]], int]:
    """Prompts per category path at each level, and how many items name no known path."""
    counts: list[Counter[str]] = [Counter(), Counter(), Counter()]
    unknown = 0
    for item in items:
        path = category_path(item)
        if not validate_path(path, taxonomy):
            unknown += 1
            continue
        for level in range(min(3, len(path))):
            counts[level]["/".join(path[: level + 1])] += 1
    return counts, unknown


def coverage_report(items: list[dict[str, Any]], taxonomy: Taxonomy) -> dict[str, Any]:
    """Prompts per category at each level, the categories no prompt covers, and unknown paths."""
    counts, unknown = level_counts(items, taxonomy)
    every = level_keys(taxonomy)
    total = max(1, len(items) - unknown)
    return {
        "prompts": len(items),
        "unknown_category": unknown,
        "top_share": {top: counts[0][top] / total for top in taxonomy},
        "counts": [dict(sorted(level.items())) for level in counts],
        "uncovered": [[key for key in keys if not counts[i][key]] for i, keys in enumerate(every)],
        "categories": [len(keys) for keys in every],
    }


def format_coverage(report: dict[str, Any]) -> str:
    lines = [f"{'top category':<14} {'share':>6}"]
    lines += [f"{top:<14} {share:>6.1%}" for top, share in report["top_share"].items()]
    covered = [n - len(u) for n, u in zip(report["categories"], report["uncovered"], strict=True)]
    lines.append("covered categories per level: " + " / ".join(
        f"{c}/{n}" for c, n in zip(covered, report["categories"], strict=True)))
    return "\n".join(lines)
