"""The chat format of the Baichuan 2 release, and packing several conversations into one sequence.

A conversation renders as ``<user> text <assistant> reply <eos> <user> ...``: role tokens, then the
turn's text. Only assistant replies and the eos that ends each are trained. Packed conversations keep
their own segment id and restart their positions, so attention never crosses from one to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from haina.core.errors import InputFileError
from haina.plugins.align.common import IGNORE, epoch_order, read_jsonl_objects

ROLES = ("system", "user", "assistant")


def render_conversation(turns: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids, labels) aligned position by position; labels are the ids of reply tokens, IGNORE elsewhere.

    A system turn is plain text before the first user turn, untrained.
    """
    ids: list[int] = []
    labels: list[int] = []
    for turn in turns:
        text = tokenizer.encode(turn["content"])
        if turn["role"] == "assistant":
            piece = [tokenizer.assistant_id]
            ids += piece + text + [tokenizer.eos_id]
            labels += [IGNORE] + text + [tokenizer.eos_id]
        else:
            piece = [tokenizer.user_id] if turn["role"] == "user" else []
            ids += piece + text
            labels += [IGNORE] * (len(piece) + len(text))
    return ids, labels


def render_prompt(turns: list[dict[str, str]], tokenizer: Any) -> list[int]:
    """The context a reply is generated from: the turns, then the assistant token."""
    ids, _ = render_conversation(turns, tokenizer)
    return ids + [tokenizer.assistant_id]


def validate_turns(turns: Any, where: str, *, reply_last: bool) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise InputFileError(f"{where}: a conversation needs a non-empty list of turns")
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise InputFileError(f"{where}: each turn needs role ({'/'.join(ROLES)}) and string content, got {turn!r:.80}")
    if reply_last and turns[-1]["role"] != "assistant":
        raise InputFileError(f"{where}: the last turn must be the assistant's reply")
    return turns


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """JSONL lines with ``conversations`` (or ``messages``): lists of role/content turns ending in a reply."""
    items = []
    for where, item in read_jsonl_objects(path):
        turns = item.get("conversations", item.get("messages"))
        item["conversations"] = validate_turns(turns, where, reply_last=True)
        items.append(item)
    if not items:
        raise InputFileError(f"{path}: no conversations")
    return items


@dataclass
class PackedSequence:
    """One training row: tokens, next-token labels, segment ids (0 = padding), restarting positions."""

    tokens: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor
    positions: torch.Tensor


@dataclass
class PackStats:
    sequences: int
    conversations: int
    truncated: int
    fill: float  # share of non-padding tokens


def pack_conversations(
    examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0
) -> tuple[list[PackedSequence], PackStats]:
    """First-fit packing in order. ``labels`` here are shifted: label[t] is the target of position t."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    truncated = 0
    for ids, labels in examples:
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        for r, free in enumerate(room):
            if len(ids) <= free:
                rows[r].append((ids, labels))
                room[r] -= len(ids)
                break
        else:
            rows.append([(ids, labels)])
            room.append(seq_len - len(ids))
    packed = [_pack_row(row, seq_len, pad_id) for row in rows]
    used = sum(seq_len - free for free in room)
    return packed, PackStats(len(packed), len(examples), truncated, used / max(1, len(packed) * seq_len))


def _pack_row(row: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> PackedSequence:
    tokens = torch.full((seq_len,), pad_id, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE, dtype=torch.long)
    segments = torch.zeros(seq_len, dtype=torch.long)
    positions = torch.zeros(seq_len, dtype=torch.long)
    start = 0
    for segment, (ids, lab) in enumerate(row, start=1):
        end = start + len(ids)
        tokens[start:end] = torch.tensor(ids)
        # position t predicts token t + 1 of the same conversation; its last position predicts nothing
        labels[start : end - 1] = torch.tensor(lab[1:])
        segments[start:end] = segment
        positions[start:end] = torch.arange(len(ids))
        start = end
    return PackedSequence(tokens, labels, segments, positions)


class ChatBatches:
    """Micro-batch ``i`` of packed conversations; a seeded shuffle of the packed rows per pass."""

    def __init__(
        self, items: list[dict[str, Any]], tokenizer: Any, seq_len: int, micro_batch_size: int, seed: int
    ) -> None:
        if not items:
            raise InputFileError("no conversations to train on")
        rendered = [render_conversation(item["conversations"], tokenizer) for item in items]
        self.rows, self.stats = pack_conversations(rendered, seq_len)
        self.micro_batch_size, self.seed = micro_batch_size, seed

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        n, m = len(self.rows), self.micro_batch_size
        picked = [self.rows[epoch_order(n, self.seed, p // n)[p % n]] for p in range(i * m, (i + 1) * m)]
        return {key: torch.stack([getattr(r, key) for r in picked]) for key in ("tokens", "labels", "segments", "positions")}
