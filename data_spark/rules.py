"""Gopher quality and repetition rules and C4 line rules as pure functions of one document.

Each check returns the first failing rule as a short reason (``None`` when the document passes), so
the removed-documents table says why. Latin prose is judged over words, CJK text over characters,
and code by line-shape rules only: English word rules would delete every Chinese document and most code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from haina.data_spark.config import HeuristicsConfig, RepetitionRules
from haina.data_spark.text import TokenTable, cjk_fraction, words, words_with_letters

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


def _first_codes(keys: np.ndarray) -> np.ndarray:
    """An id per distinct key, numbered in order of first appearance (Arrow's hash table, not a sort)."""
    return pc.dictionary_encode(pa.array(keys, pa.int64())).indices.to_numpy().astype(np.int64)


def gram_shares(
    found: TokenTable, top_sizes: Iterable[int], dup_sizes: Iterable[int]
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """({n: each list's top n-gram share}, {n: each list's duplicate n-gram share}) of every token list of
    ``found`` at once, in numpy, with Gopher/datatrove's definitions:

    * top: the characters of the most frequent n-gram (the first of them by position), times its count,
      over all the characters; 0 when no n-gram repeats;
    * duplicate: the characters of the n-grams that repeat, counting only their second and later
      occurrences (a character covered twice counts once), over all the characters.

    A gram is numbered by the number of its (n-1)-gram prefix and its last token, so every n-gram of the
    batch is told apart exactly (within its list). Each size is counted only at the positions where the
    largest smaller size found a repeat: an n-gram that occurs twice starts where every shorter gram
    occurs twice too, and a text's pairs of words repeat far more often than its runs of five. Arrow numbers
    the grams in order of first appearance, so a gram's first occurrence is where its number exceeds every
    number before it."""
    tops, dups = set(top_sizes), set(dup_sizes)
    top = {n: np.zeros(found.rows) for n in tops}
    dup = {n: np.zeros(found.rows) for n in dups}
    if not len(found.token):
        return top, dup
    token, doc, lengths, width = found.token, found.row, found.lengths, len(found.distinct)
    chars = np.fromiter(map(len, found.distinct), np.int64, width)[token]
    ends = np.cumsum(lengths)
    end = ends[doc]  # one past each position's list
    cum = np.zeros(len(token) + 1, np.int64)
    np.cumsum(chars, out=cum[1:])
    total = cum[ends] - cum[ends - lengths]
    pos = np.arange(len(token))
    gid = _first_codes(doc * width + token)
    size = 1
    for n in sorted(tops | dups):
        while size < n:  # extend the grams by one token, at the positions where the shorter ones repeat
            keep = (np.bincount(gid)[gid] > 1) & (pos + size < end[pos])
            pos, gid = pos[keep], gid[keep]
            gid = _first_codes(gid * width + token[pos + size])
            size += 1
        count = np.bincount(gid)[gid] if len(gid) else gid
        repeated = np.flatnonzero(count > 1)
        if not len(repeated):
            continue
        at, owner = pos[repeated], doc[pos[repeated]]
        if n in tops:
            seg = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            most = np.maximum.reduceat(count[repeated], seg)
            best = count[repeated] == np.repeat(most, np.diff(np.r_[seg, len(at)]))
            first = np.minimum.reduceat(np.where(best, at, len(token)), seg)
            docs = owner[seg]
            top[n][docs] = most * (cum[first + n] - cum[first]) / total[docs]
        if n in dups:
            ids = gid[repeated]
            later = at[ids <= np.maximum.accumulate(np.r_[-1, ids[:-1]])]
            # the characters each later occurrence adds to those the one before it covered (the positions
            # ascend, and a span never reaches into the next list)
            start = np.maximum(later, np.r_[0, later[:-1] + n])
            added = np.bincount(doc[later], weights=cum[later + n] - cum[start], minlength=found.rows)
            has = np.unique(doc[later])
            dup[n][has] = added[has] / total[has]
    return top, dup


def _line_reason(text: str, kind: str, rep: RepetitionRules) -> str | None:
    """The repetition rules over whole lines (the only ones for code)."""
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
    return None


def repetition_reasons(texts: list[str], kinds: list[str], rep: RepetitionRules) -> list[str | None]:
    """The first failing repetition rule of each text: its lines, then (not for code) the top n-gram and
    duplicate n-gram shares of its tokens (words for Latin text, single characters for CJK text), whose
    n-grams :func:`gram_shares` counts for all the texts at once."""
    reasons = [_line_reason(text, kind, rep) for text, kind in zip(texts, kinds, strict=True)]
    counted = [i for i, (kind, reason) in enumerate(zip(kinds, reasons, strict=True)) if kind != "code" and not reason]
    # A Chinese word is about two characters, so character n-grams are scaled to cover as much text.
    rules = {}
    for kind in {kinds[i] for i in counted}:
        scale = rep.cjk_chars_per_word if kind == "zh" else 1.0
        rules[kind] = ([(max(1, round(n * scale)), limit) for n, limit in sorted(rep.max_top_ngram_fraction.items())],
                       sorted((max(1, round(n * scale)), limit) for n, limit in rep.max_dup_ngram_fraction.items()))
    top, dup = gram_shares(TokenTable.of_texts([texts[i] for i in counted]), {n for t, _ in rules.values() for n, _ in t},
                           {n for _, d in rules.values() for n, _ in d})
    for row, i in enumerate(counted):
        top_rules, dup_rules = rules[kinds[i]]
        reasons[i] = next((f"top {n}-gram covers {top[n][row]:.2f}" for n, limit in top_rules if top[n][row] > limit),
                          None) or next((f"duplicate {n}-grams cover {dup[n][row]:.2f}" for n, limit in dup_rules
                                         if dup[n][row] > limit), None)
    return reasons


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


def document_reasons(texts: list[str], kinds: list[str], cfg: HeuristicsConfig) -> list[str | None]:
    """The first failing document rule of each text for its kind, as ``"rule: detail"``; None if all pass."""
    reasons: list[str | None] = []
    for text, kind in zip(texts, kinds, strict=True):
        lowered = text.lower()
        phrase = next((p for p in cfg.doc_blocklist if p.lower() in lowered), None)
        if phrase is not None:
            reasons.append(f"c4: contains {phrase!r}")
            continue
        reason = {"en": _english_reason, "zh": _chinese_reason, "code": _code_reason}[kind](text, cfg)
        reasons.append(f"gopher-quality: {reason}" if reason else None)
    left = [i for i, reason in enumerate(reasons) if reason is None]
    repeated = repetition_reasons([texts[i] for i in left], [kinds[i] for i in left], cfg.repetition)
    for i, reason in zip(left, repeated, strict=True):
        reasons[i] = f"gopher-repetition: {reason}" if reason else None
    return reasons


def document_reason(text: str, kind: str, cfg: HeuristicsConfig) -> str | None:
    """:func:`document_reasons` of one text."""
    return document_reasons([text], [kind], cfg)[0]
