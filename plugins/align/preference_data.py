"""Preference pairs (rm, dpo) and prompts (ppo): reading JSONL and cutting deterministic micro-batches.

A pair line: ``{"prompt": turns | str, "chosen": str, "rejected": str, "gap": 1..5 (optional),
"category": [level1, level2, level3] (optional)}``; a prompt line: ``{"prompt": turns | str, ...}``
(other fields, e.g. a reference answer, ride along). ``turns`` is a list of {"role", "content"}
ending with a user turn; a plain string is one user turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from haina.core.errors import InputFileError
from haina.plugins.align.chat_format import render_prompt, validate_turns
from haina.plugins.align.common import IGNORE, epoch_order, read_jsonl_objects


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    turns = validate_turns(value, where, reply_last=False)
    if turns[-1]["role"] != "user":
        raise InputFileError(f"{where}: the prompt's last turn must be the user's")
    return turns


def _read_jsonl(path: str | Path, need: tuple[str, ...]) -> list[dict[str, Any]]:
    items = []
    for where, item in read_jsonl_objects(path):
        for key in need:
            if not isinstance(item.get(key), str) or not item[key]:
                raise InputFileError(f"{where}: missing or empty string field {key!r}")
        item["prompt"] = _turns(item.get("prompt"), where)
        items.append(item)
    if not items:
        raise InputFileError(f"{path}: no items")
    return items


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    return _read_jsonl(path, ("chosen", "rejected"))


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    return _read_jsonl(path, ())


def category_key(item: dict[str, Any], level: int = 1) -> str:
    """The item's taxonomy path cut at ``level`` ("math/arithmetic"), or "uncategorized"."""
    path = item.get("category")
    if isinstance(path, str):
        path = path.split("/")
    return "/".join(path[:level]) if path else "uncategorized"


def render_pair_side(prompt_ids: list[int], reply_ids: list[int], seq_len: int) -> tuple[list[int], int]:
    """prompt + reply cut to ``seq_len`` (the prompt loses its oldest tokens first); (ids, prompt length)."""
    reply_ids = reply_ids[: seq_len - 1]
    keep = seq_len - len(reply_ids)
    prompt_ids = prompt_ids[-keep:]
    return prompt_ids + reply_ids, len(prompt_ids)


def _right_pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class PairBatches:
    """Micro-batch ``i``: m pairs as 2m right-padded rows, chosen first, then rejected, same order."""

    pairs: list[dict[str, Any]]
    tokenizer: Any
    seq_len: int
    micro_batch_size: int
    seed: int
    _encoded: dict[int, tuple[list[int], int, list[int], int]] = field(default_factory=dict, repr=False)

    def _encode(self, k: int) -> tuple[list[int], int, list[int], int]:
        if k not in self._encoded:
            item, tok = self.pairs[k], self.tokenizer
            prompt = render_prompt(item["prompt"], tok)
            chosen = render_pair_side(prompt, tok.encode(item["chosen"]) + [tok.eos_id], self.seq_len)
            rejected = render_pair_side(prompt, tok.encode(item["rejected"]) + [tok.eos_id], self.seq_len)
            self._encoded[k] = (*chosen, *rejected)
        return self._encoded[k]

    def batch(self, i: int) -> dict[str, Any]:
        n, m = len(self.pairs), self.micro_batch_size
        picks = [(i * m + j) for j in range(m)]
        index = [epoch_order(n, self.seed, p // n)[p % n] for p in picks]
        sides = [self._encode(k) for k in index]
        rows = [s[0] for s in sides] + [s[2] for s in sides]
        prompt_lens = [s[1] for s in sides] + [s[3] for s in sides]
        tokens = _right_pad(rows, pad_id=0)
        lengths = torch.tensor([len(r) for r in rows])
        response = response_mask_from_prompts(prompt_lens, lengths.tolist(), tokens.shape[1])
        items = [self.pairs[k] for k in index]
        return {
            "tokens": tokens,
            "response": response,
            "last": lengths - 1,
            "gap": torch.tensor([float(it.get("gap", 0)) for it in items]),
            "items": items,
        }


@dataclass
class PromptBatches:
    """Micro-batch ``i``: m prompts as token-id lists (rendered to end with the assistant token)."""

    prompts: list[dict[str, Any]]
    tokenizer: Any
    seq_len: int
    micro_batch_size: int
    seed: int

    def batch(self, i: int) -> dict[str, Any]:
        """``positions``: each prompt's place in the run's stream of prompts, the same on every layout
        (rollouts seed their sampling by it, so data-parallel ranks repeat what one process draws)."""
        n, m = len(self.prompts), self.micro_batch_size
        positions = list(range(i * m, (i + 1) * m))
        index = [epoch_order(n, self.seed, p // n)[p % n] for p in positions]
        items = [self.prompts[k] for k in index]
        ids = [render_prompt(it["prompt"], self.tokenizer)[-self.seq_len // 2 :] for it in items]
        return {"ids": ids, "items": items, "positions": positions}


def response_mask_from_prompts(prompt_lens: list[int], lengths: list[int], width: int) -> torch.Tensor:
    """[b, width] True on each row's response tokens (between its prompt and its end)."""
    mask = torch.zeros(len(prompt_lens), width, dtype=torch.bool)
    for r, (start, end) in enumerate(zip(prompt_lens, lengths, strict=True)):
        mask[r, start:end] = True
    return mask


__all__ = [
    "IGNORE",
    "PairBatches",
    "PromptBatches",
    "category_key",
    "read_pairs",
    "read_prompts",
    "render_pair_side",
    "response_mask_from_prompts",
]
