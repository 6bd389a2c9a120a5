"""Gopher quality and repetition rules and C4 line rules as pure functions of one document.

Each check returns the first failing rule as a short reason (``None`` when the document passes), so
the removed-documents table says why. Latin prose is judged over words, CJK text over characters,
and code by line-shape rules only: English word rules would delete every Chinese document and most code.
"""

from __future__ import annotations

from collections import Counter
from itertools import compress, filterfalse

from haina.data_spark.config import HeuristicsConfig, RepetitionRules
from haina.data_spark.text import cjk_fraction, tokens, words

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


def _top_fraction(units: list[str], n: int, total: int) -> float:
    """Share of characters in the most frequent n-gram (0 when no n-gram repeats)."""
    if len(units) < n or not total:
        return 0.0
    counts = Counter(zip(*(units[i:] for i in range(n)), strict=False))
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(len(u) for u in gram) / total


def _dup_fractions(units: list[str], sizes: list[int], total: int):
    """(n, share of characters in repeated n-grams) for each of ``sizes`` (ascending), lazily.

    Gopher/datatrove convention: only the second and later occurrences count as duplicated text. An
    n-gram that occurs twice starts at a position where every shorter gram occurs twice too, so each
    size counts only the positions the previous size found repeated: the same shares, without counting
    every n-gram of the text for every n."""
    positions: list[int] | None = None
    for n in sizes:
        if len(units) < n or not total:
            yield n, 0.0
            continue
        last = len(units) - n
        candidates = range(last + 1) if positions is None else [i for i in positions if i <= last]
        grams = [tuple(units[i : i + n]) for i in candidates]
        counts = Counter(grams)
        covered = [False] * len(units)
        seen: set[tuple[str, ...]] = set()
        repeated = []
        for i, gram in zip(candidates, grams, strict=True):
            if counts[gram] > 1:
                repeated.append(i)
                if gram in seen:
                    covered[i : i + n] = [True] * n
                seen.add(gram)
        positions = repeated
        if not repeated:  # nothing repeats at this size: nothing covered (nor at any larger size)
            yield n, 0.0
            continue
        yield n, sum(map(len, compress(units, covered))) / total


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
    total = sum(map(len, units))
    # A Chinese word is about two characters, so character n-grams are scaled to cover as much text.
    scale = rep.cjk_chars_per_word if kind == "zh" else 1.0
    for n, limit in sorted(rep.max_top_ngram_fraction.items()):
        n = max(1, round(n * scale))
        share = _top_fraction(units, n, total)
        if share > limit:
            return f"top {n}-gram covers {share:.2f}"
    limits = sorted((max(1, round(n * scale)), limit) for n, limit in rep.max_dup_ngram_fraction.items())
    for (n, share), (_, limit) in zip(_dup_fractions(units, [n for n, _ in limits], total), limits, strict=False):
        if share > limit:
            return f"duplicate {n}-grams cover {share:.2f}"
    return None


def _english_reason(text: str, cfg: HeuristicsConfig) -> str | None:
    rules = cfg.en
    found = words(text)
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
    raw_words = text.split()
    # a word has a letter: every all-letter word, and those of the others with one (few, looked at one by one)
    with_letter = sum(map(str.isalpha, raw_words)) + sum(1 for w in filterfalse(str.isalpha, raw_words)
                                                          if any(map(str.isalpha, w)))
    alpha = with_letter / max(1, len(raw_words))
    if alpha < rules.min_alpha_word_fraction:
        return f"alphabetic words {alpha:.2f}"
    stops = sum(map(STOP_WORDS.__contains__, map(str.lower, found)))
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
