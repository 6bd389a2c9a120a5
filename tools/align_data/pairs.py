"""``haina rm pairs``: chosen/rejected pairs from scored responses, ready for ``haina rm`` and ``haina dpo``.

Scores come from one of three places:

- a labelling file (JSONL of ``{"id": response id, "score": number}`` or ``{"id", "rank"}``, rank 1 best),
  as human labellers produce them;
- a trained reward model (``--reward-model RUN``), which scores prompt + response like ``haina rm`` does;
- a verifier function (``--verifier module:function``, called as ``function(record, response) -> float``)
  for synthetic tasks whose answers can be checked.

For each prompt, every two distinct responses whose scores differ by at least ``min_gap`` make a pair,
the better one chosen, with the score difference as ``gap`` (the reward model's margin and its accuracy
by gap use it). ``max_pairs_per_prompt`` keeps the widest gaps first.
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict
from collections.abc import Callable
from itertools import combinations
from pathlib import Path
from typing import Any

from haina.core.checkpoint import resolve_checkpoint
from haina.core.errors import ConfigError, InputFileError
from haina.core.files import read_jsonl, write_durable
from haina.core.model_loading import load_model, run_config
from haina.core.tokenizer import load_tokenizer
from haina.plugins.algorithms.reward_model import last_token_scores
from haina.plugins.align.chat_format import render_prompt
from haina.plugins.align.preference_data import render_pair_side

PROVENANCE = ("model", "setting", "step", "id")


def scores_from_labels(path: str | Path) -> dict[str, float]:
    """Response id -> score; ranks become negative scores so that rank 1 is best."""
    scores: dict[str, float] = {}
    for where, row in read_jsonl(path):
        if "id" not in row or ("score" not in row and "rank" not in row):
            raise InputFileError(f"{where}: a label needs an id and a score or a rank")
        try:
            scores[str(row["id"])] = float(row["score"]) if "score" in row else -float(row["rank"])
        except (TypeError, ValueError):
            raise InputFileError(f"{where}: the score or rank must be a number") from None
    return scores


def load_verifier(spec: str) -> Callable[[dict[str, Any], str], float]:
    module, sep, name = spec.partition(":")
    if not sep:
        raise ConfigError(f"--verifier {spec!r}: expected module:function")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"--verifier {spec!r}: no function {name} in module {module}") from None
    return function


def scores_from_reward_model(records: list[dict[str, Any]], run: str, batch_size: int = 16) -> dict[str, float]:
    """A trained reward model's score of each prompt + response (its last token's value)."""
    import torch

    algorithm = run_config(resolve_checkpoint(run)).algorithm
    if algorithm != "rm":
        raise InputFileError(f"{run}: not a reward model run (algorithm={algorithm})")
    cfg, model = load_model(run, value_head=True)
    tokenizer = load_tokenizer(cfg)
    scores: dict[str, float] = {}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        rows = [render_pair_side(render_prompt(r["prompt"], tokenizer), tokenizer.encode(r["response"]) + [tokenizer.eos_id],
                                 cfg.train.seq_len)[0] for r in batch]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            values = last_token_scores(model, tokens, torch.tensor([len(r) - 1 for r in rows]))
        scores.update({r["id"]: float(v) for r, v in zip(batch, values, strict=True)})
    return scores


def build_pairs(
    records: list[dict[str, Any]], scores: dict[str, float], min_gap: float = 0.0, max_pairs_per_prompt: int = 0
) -> list[dict[str, Any]]:
    """Pairs per prompt from scored responses; unscored, empty and duplicate responses are left out."""
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record["id"] in scores:
            by_prompt[str(record.get("prompt_id", record["id"]))].append(record)
    pairs: list[dict[str, Any]] = []
    for prompt_id in sorted(by_prompt):
        seen: dict[str, dict[str, Any]] = {}
        for record in by_prompt[prompt_id]:  # one copy of each distinct response: the best-scored
            key = record["response"].strip()
            if not key:  # nothing to learn a preference from (and the pair readers refuse it)
                continue
            if key not in seen or scores[record["id"]] > scores[seen[key]["id"]]:
                seen[key] = record
        found = []
        for a, b in combinations(seen.values(), 2):
            gap = abs(scores[a["id"]] - scores[b["id"]])
            if gap <= 0 or gap < min_gap:
                continue
            chosen, rejected = (a, b) if scores[a["id"]] > scores[b["id"]] else (b, a)
            found.append({
                "id": f"{chosen['id']}>{rejected['id']}",
                "prompt_id": prompt_id,
                "prompt": chosen["prompt"],
                "chosen": chosen["response"],
                "rejected": rejected["response"],
                "gap": round(gap, 6),
                "chosen_score": scores[chosen["id"]],
                "rejected_score": scores[rejected["id"]],
                **({"category": chosen["category"]} if "category" in chosen else {}),
                "chosen_from": {k: chosen.get(k) for k in PROVENANCE},
                "rejected_from": {k: rejected.get(k) for k in PROVENANCE},
            })
        found.sort(key=lambda p: (-p["gap"], p["id"]))
        pairs += found[:max_pairs_per_prompt] if max_pairs_per_prompt else found
    return pairs


def run_pairs(args: Any) -> int:
    records = []
    for where, record in read_jsonl(args.responses):
        if not all(k in record for k in ("id", "prompt", "response")):
            raise InputFileError(f"{where}: a response record needs id, prompt and response")
        records.append(record)
    sources = [x for x in (args.labels, args.reward_model, args.verifier) if x]
    if len(sources) != 1:
        raise ConfigError("give exactly one of --labels FILE, --reward-model RUN, --verifier module:function")
    if args.labels:
        scores = scores_from_labels(args.labels)
    elif args.reward_model:
        scores = scores_from_reward_model(records, args.reward_model)
    else:
        verifier = load_verifier(args.verifier)
        scores = {r["id"]: float(verifier(r, r["response"])) for r in records}
    pairs = build_pairs(records, scores, args.min_gap, args.max_pairs_per_prompt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_durable(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    prompts = len({p["prompt_id"] for p in pairs})
    print(f"{len(pairs)} pairs from {prompts} prompts ({len(records)} responses, {len(scores)} scored) written to {out}")
    return 0
