"""Gopher quality and repetition rules and C4 line rules as pure functions of one document.

Each check returns the first failing rule as a short reason (``None`` when the document passes), so
the removed-documents table says why. Latin prose is judged over words, CJK text over characters,
and code by line-shape rules only: English word rules would delete every Chinese document and most code.
"""

from __future__ import annotations

from collections import Counter
from itertools import compress

from haina.data_spark.config import HeuristicsConfig, RepetitionRules
from haina.data_spark.text import cjk_fraction, tokens, words, words_with_letters

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "▪", "◦", "-", "*", "·", "‣")
_TERMINAL = (".", "!", "?", '"', "”", "'", "’", "。", "！", "？", ":", ")")


def clean_lines(text: str, kind: str, cfg: HeuristicsConfig) -> tuple[str, int]:
    """C4 line rules: drop boilerplate lines (all kinds) and, optionally, unterminated prose lines."""
    blocklist = [phrase.lower() for phrase in cfg.line_blocklist]
    if not cfg.require_terminal_punctuation:
        lowered = text.lower()  # no phrase anywhere in the text, so in no line: most texts end here
        if not any(phrase in lowered for phrase in blocklist):
            return text.strip("\n"), 0
    kept, dropped = [], 0
    for line in text.split("\n"):
        lowered = line.lower()
        if any(phrase in lowered for phrase in blocklist):
            dropped += 1
            continue
        if (
            cfg.require_terminal_punctuation
            and kind == "en"
            and line.strip()
            and not line.rstrip().endswith(_TERMINAL)
        ):
            dropped += 1
            continue
        kept.append(line)
    return "\n".join(kept).strip("\n"), dropped


class _Grams:
    """The n-gram measures of one token list, each size counted only where a repeat can start.

    An n-gram that occurs twice starts at positions where every shorter gram occurs twice too, so a size
    looks only at the positions where the largest smaller size already counted found a repeat (all of
    them for the first size): the same shares as counting every n-gram of the text for every n, for a
    fraction of the work, since a text's pairs of words repeat far more often than its runs of five."""

    def __init__(self, units: list[str]) -> None:
        self.units, self.total = units, sum(map(len, units))
        self.counted: dict[int, tuple[Counter, list[tuple[int, tuple[str, ...]]]]] = {}

    def _count(self, n: int) -> tuple[Counter, list[tuple[int, tuple[str, ...]]]]:
        """(counts of the n-grams at the positions looked at, (position, gram) of each one that repeats)."""
        if n not in self.counted:
            units, last = self.units, len(self.units) - n
            below = [m for m in self.counted if m < n]
            if below:
                starts = [i for i, _ in self.counted[max(below)][1] if i <= last]
                grams = [tuple(units[i : i + n]) for i in starts]
            else:
                starts = range(last + 1)
                grams = list(zip(*(units[i:] for i in range(n)), strict=False))
            counts = Counter(grams)
            self.counted[n] = counts, [(i, g) for i, g in zip(starts, grams, strict=True) if counts[g] > 1]
        return self.counted[n]

    def top(self, n: int) -> float:
        """The share of characters in the most frequent n-gram (the first of them), 0 when none repeats."""
        if len(self.units) < n or not self.total:
            return 0.0
        counts, repeated = self._count(n)
        if not repeated:
            return 0.0
        most = max(counts.values())
        gram = next(g for _, g in repeated if counts[g] == most)
        return most * sum(map(len, gram)) / self.total

    def duplicated(self, n: int) -> float:
        """The share of characters in repeated n-grams, counting only the second and later occurrences
        (Gopher/datatrove's convention)."""
        if len(self.units) < n or not self.total:
            return 0.0
        repeated = self._count(n)[1]
        covered, seen = [False] * len(self.units), set()
        for i, gram in repeated:
            if gram in seen:
                covered[i : i + n] = [True] * n
            else:
                seen.add(gram)
        return sum(map(len, compress(self.units, covered))) / self.total if repeated else 0.0


def repetition_reason(text: str, kind: str, rep: RepetitionRules) -> str | None:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if kind == "code":
        meaningful = [line for line in lines if len(line) >= 10]
        counts = Counter(meaningful)
        dup = sum(c for c in counts.values() if c > 1)
        if meaningful and dup / len(meaningful) > rep.code_max_dup_line_fraction:
            return f"duplicate lines {dup / len(meaningful):.2f}"
        return None
    if lines:
        counts = Counter(lines)
        dup_lines = sum(c - 1 for c in counts.values() if c > 1)
        if dup_lines / len(lines) > rep.max_dup_line_fraction:
            return f"duplicate lines {dup_lines / len(lines):.2f}"
        dup_chars = sum(len(line) * (c - 1) for line, c in counts.items() if c > 1)
        total_chars = sum(len(line) for line in lines)
        if total_chars and dup_chars / total_chars > rep.max_dup_line_char_fraction:
            return f"duplicate line characters {dup_chars / total_chars:.2f}"
    units = tokens(text)  # words for Latin text, single characters for CJK text
    grams = _Grams(units)
    # A Chinese word is about two characters, so character n-grams are scaled to cover as much text.
    scale = rep.cjk_chars_per_word if kind == "zh" else 1.0
    for n, limit in sorted(rep.max_top_ngram_fraction.items()):
        n = max(1, round(n * scale))
        share = grams.top(n)
        if share > limit:
            return f"top {n}-gram covers {share:.2f}"
    for n, limit in sorted((max(1, round(n * scale)), limit) for n, limit in rep.max_dup_ngram_fraction.items()):
        share = grams.duplicated(n)
        if share > limit:
            return f"duplicate {n}-grams cover {share:.2f}"
    return None


def _english_reason(text: str, cfg: HeuristicsConfig) -> str | None:
    rules = cfg.en
    ascii = text.isascii()  # its words lower-cased at once, as long as they were (not so for every script)
    found = words(text.lower() if ascii else text)
    if len(found) < rules.min_words:
        return f"too few words ({len(found)} < {rules.min_words})"
    if len(found) > rules.max_words:
        return f"too many words ({len(found)})"
    mean = sum(map(len, found)) / len(found)
    if not rules.min_mean_word_len <= mean <= rules.max_mean_word_len:
        return f"mean word length {mean:.1f}"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / len(found) > rules.max_symbol_word_ratio:
        return f"symbol-to-word ratio {symbols / len(found):.2f}"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if lines:
        bullets = sum(1 for line in lines if line.startswith(BULLETS))
        if bullets / len(lines) > rules.max_bullet_line_fraction:
            return f"bullet lines {bullets / len(lines):.2f}"
        ellipsis = sum(1 for line in lines if line.endswith(("...", "…")))
        if ellipsis / len(lines) > rules.max_ellipsis_line_fraction:
            return f"ellipsis lines {ellipsis / len(lines):.2f}"
    raw_words, with_letter = words_with_letters(text)
    alpha = with_letter / max(1, raw_words)
    if alpha < rules.min_alpha_word_fraction:
        return f"alphabetic words {alpha:.2f}"
    stops = sum(map(STOP_WORDS.__contains__, found if ascii else map(str.lower, found)))
    if stops < rules.min_stop_words:
        return f"stop words {stops} < {rules.min_stop_words}"
    return None


def _chinese_reason(text: str, cfg: HeuristicsConfig) -> str | None:
    rules = cfg.zh
    chars = [c for c in text if not c.isspace()]
    if len(chars) < rules.min_chars:
        return f"too few characters ({len(chars)} < {rules.min_chars})"
    share = cjk_fraction(text)
    if share < rules.min_cjk_fraction:
        return f"CJK share {share:.2f}"
    symbols = sum(1 for c in chars if not c.isalnum())
    if symbols / len(chars) > rules.max_symbol_char_ratio:
        return f"symbol-to-character ratio {symbols / len(chars):.2f}"
    return None


def _code_reason(text: str, cfg: HeuristicsConfig) -> str | None:
    rules = cfg.code
    lines = text.split("\n")
    longest = max(len(line) for line in lines)
    if longest > rules.max_line_chars:
        return f"line of {longest} characters"
    mean = sum(len(line) for line in lines) / len(lines)
    if mean > rules.max_mean_line_chars:
        return f"mean line length {mean:.0f}"
    chars = [c for c in text if not c.isspace()]
    alnum = sum(1 for c in chars if c.isalnum()) / max(1, len(chars))
    if alnum < rules.min_alnum_fraction:
        return f"alphanumeric share {alnum:.2f}"
    return None


def document_reason(text: str, kind: str, cfg: HeuristicsConfig) -> str | None:
    """The first failing document rule for ``kind``, as ``"rule: detail"``; None if all pass."""
    lowered = text.lower()
    for phrase in cfg.doc_blocklist:
        if phrase.lower() in lowered:
            return f"c4: contains {phrase!r}"
    check = {"en": _english_reason, "zh": _chinese_reason, "code": _code_reason}[kind]
    reason = check(text, cfg)
    if reason:
        return f"gopher-quality: {reason}"
    reason = repetition_reason(text, kind, cfg.repetition)
    return f"gopher-repetition: {reason}" if reason else None
