"""A small task with answers the project can verify, in English and Chinese, for the alignment demo and
tests: addition, and three string transformations (reverse, uppercase, count letters).

Everything is generated from a seed: SFT conversations with the right reply, preference pairs whose
rejected reply is wrong by an amount that sets the pair's score gap (1 = nearly right .. 5 = unrelated),
and prompts with a three-level category and the answer, which :func:`reward` checks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "fish",
    "bird",
    "milk",
    "rain",
    "star",
    "moon",
    "lamp",
    "door",
    "road",
    "ship",
    "king",
    "cake",
    "frog",
    "wind",
    "rock",
    "leaf",
    "bell",
    "coin",
    "rope",
    "salt",
    "snow",
    "wolf",
    "bear",
    "corn",
    "gold",
    "iron",
]

# kind -> (category path, English template, Chinese template)
KINDS: dict[str, tuple[list[str], str, str]] = {
    "addition": (["math", "arithmetic", "addition"], "What is {a} + {b}?", "{a} 加 {b} 等于多少？"),
    "reverse": (["text", "transform", "reverse"], "Reverse the word: {w}", "把这个词倒过来：{w}"),
    "uppercase": (["text", "transform", "uppercase"], "Uppercase: {w}", "转成大写：{w}"),
    "count": (["text", "transform", "count_letters"], "How many letters in {w}?", "{w} 有几个字母？"),
}


def _answer(kind: str, a: int, b: int, w: str) -> str:
    return {"addition": str(a + b), "reverse": w[::-1], "uppercase": w.upper(), "count": str(len(w))}[kind]


def make_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = rng.choice(sorted(KINDS))
        category, english, chinese = KINDS[kind]
        a, b, w = rng.randint(1, 20), rng.randint(1, 20), rng.choice(WORDS)
        language = rng.choice(("en", "zh"))
        text = (english if language == "en" else chinese).format(a=a, b=b, w=w)
        items.append(
            {
                "id": f"{seed}-{i}",
                "prompt": [{"role": "user", "content": text}],
                "answer": _answer(kind, a, b, w),
                "kind": kind,
                "language": language,
                "category": category,
            }
        )
    return items


def sft_conversations(n: int, seed: int, miscount: float = 0.0) -> list[dict[str, Any]]:
    """SFT conversations with the right reply, except that a ``miscount`` share of the letter-count replies
    is one too many: an annotator's systematic error, which imitation learns and a verifier can see."""
    rng = random.Random(seed + 2)
    out = []
    for p in make_prompts(n, seed):
        reply = p["answer"]
        if p["kind"] == "count" and rng.random() < miscount:
            reply = str(int(reply) + 1)
        out.append({"id": p["id"], "category": p["category"],
                    "conversations": [*p["prompt"], {"role": "assistant", "content": reply}]})
    return out


def wrong_answer(answer: str, gap: int, rng: random.Random) -> str:
    """A reply wrong by about ``gap`` (1..5): a near miss for 1, something unrelated for 5."""
    if answer.isdigit():
        return str(int(answer) + rng.choice((-1, 1)) * (gap if gap < 5 else rng.randint(20, 90)))
    if gap >= 5:
        return rng.choice([w for w in WORDS if w != answer.lower()])
    chars = list(answer)
    for pos in rng.sample(range(len(chars)), min(gap, len(chars))):
        chars[pos] = "x" if chars[pos] != "x" else "y"
    return "".join(chars)


def preference_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    pairs = []
    for p in make_prompts(n, seed):
        gap = rng.randint(1, 5)
        pairs.append(
            {
                "id": p["id"],
                "prompt": p["prompt"],
                "chosen": p["answer"],
                "rejected": wrong_answer(p["answer"], gap, rng),
                "gap": gap,
                "category": p["category"],
            }
        )
    return pairs


def reward(item: dict[str, Any], response: str) -> float:
    """1 for exactly the answer, 0.5 when the reply contains it among other text, else 0."""
    reply = response.strip()
    if reply == item["answer"]:
        return 1.0
    return 0.5 if item["answer"] in reply else 0.0


def verify(response: str, answer: str) -> float:
    """:func:`reward` as a ``verifier`` reward plugin calls it (``haina.tools.align_data.task:verify``)."""
    return reward({"answer": answer}, response)


def write_jsonl(items: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path
