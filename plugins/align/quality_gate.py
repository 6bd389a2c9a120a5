"""The report's SFT data-quality gate: spot-check a sample of every annotation batch, reject weak batches.

Each annotation batch (items sharing a ``batch`` field) gets ``sample_size`` items drawn with a fixed
seed; a reviewer (a JSONL file of ``{"id", "accept"}`` verdicts, or a function) judges them, and a batch
whose acceptance rate falls below ``threshold`` is dropped whole, as the report's experts did.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from haina.core.errors import InputFileError
from haina.core.files import read_jsonl

Reviewer = Callable[[dict[str, Any]], bool]


@dataclass
class BatchVerdict:
    batch: str
    items: int
    sampled: int
    accepted: int
    rate: float
    kept: bool


@dataclass
class GateReport:
    threshold: float
    batches: list[BatchVerdict] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "batches": [asdict(b) for b in self.batches],
            "kept_items": len(self.kept),
            "rejected_batches": [b.batch for b in self.batches if not b.kept],
        }


def reviewer_from_file(path: str | Path) -> Reviewer:
    """Verdicts by item id from JSONL; asking about an id the reviewer never judged is an error."""
    verdicts: dict[str, bool] = {}
    for where, row in read_jsonl(path):
        if "id" not in row or "accept" not in row:
            raise InputFileError(f"{where}: expected {{\"id\": ..., \"accept\": true|false}}")
        verdicts[str(row["id"])] = bool(row["accept"])

    def review(item: dict[str, Any]) -> bool:
        key = str(item.get("id"))
        if key not in verdicts:
            raise InputFileError(f"{path}: no verdict for sampled item id {key!r}")
        return verdicts[key]

    return review


def spot_check(
    batches: dict[str, list[dict[str, Any]]],
    sample_size: int,
    threshold: float,
    reviewer: Reviewer | str | Path,
    seed: int = 0,
) -> GateReport:
    if sample_size < 1 or not 0 <= threshold <= 1:
        raise ValueError("the quality gate wants sample_size >= 1 and 0 <= threshold <= 1")
    review = reviewer if callable(reviewer) else reviewer_from_file(reviewer)
    report = GateReport(threshold)
    for name in sorted(batches):
        items = batches[name]
        if not items:
            raise InputFileError(f"annotation batch {name!r} has no items to spot-check")
        rng = random.Random(f"{seed}:{name}")
        sample = rng.sample(items, min(sample_size, len(items)))
        accepted = sum(bool(review(item)) for item in sample)
        rate = accepted / len(sample)
        kept = rate >= threshold
        report.batches.append(BatchVerdict(name, len(items), len(sample), accepted, rate, kept))
        if kept:
            report.kept.extend(items)
    return report


def group_by_batch(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(str(item.get("batch", "default")), []).append(item)
    return groups


def format_gate(report: GateReport) -> str:
    lines = [f"{'batch':<16} {'items':>6} {'sampled':>8} {'accepted':>9} {'rate':>6}  verdict"]
    for b in report.batches:
        verdict = "kept" if b.kept else "REJECTED"
        lines.append(f"{b.batch:<16} {b.items:>6} {b.sampled:>8} {b.accepted:>9} {b.rate:>6.2f}  {verdict}")
    return "\n".join(lines)
