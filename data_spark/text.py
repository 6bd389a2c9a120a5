"""Script-aware text helpers shared by the stages: kind detection, words, sentences, shingle tokens.

Chinese has no spaces between words, so every measure that Latin text takes over words is taken over
characters for CJK text; mixed text yields words for its Latin runs and characters for its CJK runs.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK = re.compile(f"[{CJK_RANGES}]")
# A token is a CJK character or a run of letters/digits (Unicode-aware, underscore excluded).
_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\W_{CJK_RANGES}]+")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_STOPS, _CJK_STOPS = ".!?。！？；;", "。！？"  # a sentence ends after one (and the space after it); a CJK one needs none
_SENTENCE_END = re.compile(f"(?<=[{_STOPS}])\\s+|(?<=[{_CJK_STOPS}])")
# Where :func:`sentences_by_line` cuts a text: a full stop and the spaces after it (not a line break), a CJK
# full stop on its own, or a line break. Matching from the stop rather than looking behind for it lets the
# regex engine skip to the next candidate character: one pass over a text in half the time of a split on
# _SENTENCE_END per line.
_SENTENCE_CUT = re.compile(f"[{_STOPS}][^\\S\n]+|[{_CJK_STOPS}]|\n")
_CODE_HINTS = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|#include|function |public |private |var |let |const |"
    r"if \(|for \(|while \(|\}|@\w+)",
    re.M,
)
_NOT_ALNUM_OR_SPACE = re.compile(r"[^\w\s]|_")
_SYMBOL = re.compile(r"[^\w\s]")
# The ASCII shortcuts: on ASCII text the token, word and symbol regexes come down to character classes, which
# str.translate and bytes.translate apply in C without making a string per match (a regex's findall over a
# document cost two to six times as much). Each is checked against its regex on every ASCII character.
_ASCII = [chr(c) for c in range(128)]
_ASCII_PUNCTUATION = str.maketrans({c: " " for c in _ASCII if not (c.isalnum() or c.isspace())})
_ASCII_TOKEN_CUT = str.maketrans({c: c.lower() if c.isalnum() else " " for c in _ASCII})  # lower-cased runs
_ASCII_TOKEN_BYTES = bytes(ord(c.lower() if c.isalnum() else " ") for c in _ASCII) + bytes(range(128, 256))
_ASCII_WORD_CUT = str.maketrans({c: " " for c in _ASCII if not (c.isalnum() or c == "'")})
_LONE_APOSTROPHE = re.compile("'(?:(?![A-Za-z0-9])|(?<![A-Za-z0-9]'))")  # one not between two alphanumerics
_ALNUM_RUNS = bytes.maketrans(bytes(range(128)), bytes(ord("a" if c.isalnum() else " ") for c in _ASCII))
_NOT_SYMBOLS = bytes(ord(c) for c in _ASCII if c.isalnum() or c.isspace() or c == "_")
_SPACE_OR_WORD = bytes.maketrans(bytes(range(128)), bytes(ord(" " if c.isspace() else "w") for c in _ASCII))
_NEITHER_LETTER_NOR_SPACE = bytes(ord(c) for c in _ASCII if not (c.isalpha() or c.isspace()))


def is_cjk(char: str) -> bool:
    return bool(_CJK.match(char))


def cjk_fraction(text: str) -> float:
    """Share of CJK characters among letters (0 when there are no letters)."""
    if text.isascii():  # most texts: no CJK character, and no need to count the letters
        return 0.0
    letters = sum(map(str.isalpha, text))  # isalpha is exactly the categories Lu, Ll, Lt, Lm, Lo
    return len(_CJK.findall(text)) / letters if letters else 0.0


def detect_kind(text: str) -> str:
    """``"zh"``, ``"code"`` or ``"en"`` (Latin-script prose) from the text alone; cheap and deterministic."""
    if cjk_fraction(text[:20_000]) >= 0.3:
        return "zh"
    lines = [line for line in text[:20_000].splitlines() if line.strip()]
    if not lines:
        return "en"
    hinted = len(_CODE_HINTS.findall(text[:20_000]))
    symbolic = sum(1 for line in lines if line.rstrip().endswith((":", "{", "}", ";", ")", ",")))
    if (hinted + symbolic) / len(lines) >= 0.4:
        return "code"
    return "en"


def words(text: str) -> list[str]:
    """Latin-style words (letters/digits with inner apostrophes); CJK characters are not words here."""
    if text.isascii():  # every character but the alphanumerics and the apostrophes between them splits words
        cut = text.translate(_ASCII_WORD_CUT)
        return (_LONE_APOSTROPHE.sub(" ", cut) if "'" in cut else cut).split()
    return _WORD.findall(_CJK.sub(" ", text))


def words_with_letters(text: str) -> tuple[int, int]:
    """(the whitespace-separated words of ``text``, those of them with a letter)."""
    if text.isascii():  # the words left when every character but letters and spaces is deleted
        raw = text.encode("ascii")
        lettered = b" " + raw.translate(_SPACE_OR_WORD, _NEITHER_LETTER_NOR_SPACE)  # (deleted, then mapped)
        return (b" " + raw.translate(_SPACE_OR_WORD)).count(b" w"), lettered.count(b" w")
    found = text.split()
    return len(found), sum(1 for word in found if any(map(str.isalpha, word)))


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens with every CJK character its own token: the unit of shingles and n-grams."""
    if text.isascii():
        return text.translate(_ASCII_TOKEN_CUT).split()
    return _TOKEN.findall(text.lower())


def approx_tokens(text: str) -> int:
    """Tokens in the report's sense before a tokenizer exists: words + CJK characters + symbols."""
    # [^\w\s]: neither alphanumeric nor "_" nor space
    if text.isascii():  # runs of alphanumerics (each starts after a non-alphanumeric) and the symbols
        raw = text.encode("ascii")
        return (b" " + raw.translate(_ALNUM_RUNS)).count(b" a") + len(raw.translate(None, _NOT_SYMBOLS))
    return len(_TOKEN.findall(text)) + len(_SYMBOL.findall(text))


class TokenTable:
    """The :func:`tokens` of many texts (or any lists of tokens), dictionary-encoded by Arrow: ``token`` (an
    index into ``distinct``) and ``row`` of every token in order, and each list's length. Arrow, not Python,
    finds the distinct tokens, so what a batch needs per token (a hash, a length, a feature id) is taken once
    per distinct token and spread in numpy."""

    def __init__(self, unit_lists: list[list[str]] | pa.Array) -> None:
        lists = unit_lists if isinstance(unit_lists, pa.Array) else pa.array(unit_lists, pa.large_list(pa.large_string()))
        self.rows = len(lists)
        self.lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        encoded = lists.flatten().dictionary_encode()
        self.token = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.distinct: list[str] = encoded.dictionary.to_pylist()
        self.row = np.repeat(np.arange(self.rows, dtype=np.int64), self.lengths)

    @classmethod
    def of_texts(cls, texts: list[str | None]) -> TokenTable:
        """The table of each text's :func:`tokens` (none for a missing text), cut by Arrow without a Python
        string per token (:func:`_cut_by_arrow`)."""
        cut = _cut_by_arrow([text if text is None or text.isascii() else " ".join(tokens(text)) for text in texts])
        cut = pc.if_else(pc.equal(pc.binary_length(cut), 0), None, cut)  # Arrow cuts "" into [""]
        return cls(pc.ascii_split_whitespace(cut))

    def per_row(self, per_token: np.ndarray) -> np.ndarray:
        """The sum over each row's tokens of a value per distinct token."""
        if not len(self.token):
            return np.zeros(self.rows, dtype=np.int64)
        return np.bincount(self.row, weights=per_token[self.token], minlength=self.rows).astype(np.int64)


def _cut_by_arrow(plain: list[str | None]) -> pa.Array:
    """The texts lower-cased, every other character but the alphanumerics made a space, and trimmed, for
    Arrow to split at the spaces: the ASCII ones in one translation of the array's bytes. A text with other
    characters must come as its units already cut and joined by spaces, which the translation leaves as
    they are (it maps no byte past ASCII, and lower-case alphanumerics and spaces to themselves)."""
    array = pa.array(plain, pa.large_string())
    validity, offsets, data = array.buffers()
    if data is not None:
        data = pa.py_buffer(data.to_pybytes().translate(_ASCII_TOKEN_BYTES))
    array = pa.Array.from_buffers(pa.large_string(), len(array), [validity, offsets, data], array.null_count)
    return pc.ascii_trim_whitespace(array)


def sentences(line: str) -> list[str]:
    """Split one line into sentences at . ! ? and CJK full stops; the pieces keep their punctuation."""
    return [piece for piece in _SENTENCE_END.split(line) if piece and piece.strip()]


def sentences_by_line(text: str) -> list[list[str]]:
    """The :func:`sentences` of each line of ``text`` (the lines of ``text.split("\\n")``), from one pass over
    the whole text."""
    lines: list[list[str]] = []
    line: list[str] = []
    start = 0
    for match in _SENTENCE_CUT.finditer(text):
        first, end = match.span()
        # a line break ends its piece before it, a full stop with spaces after it, a CJK full stop after it
        piece = text[start : first if text[first] == "\n" else first + 1]
        if piece and not piece.isspace():
            line.append(piece)
        if text[first] == "\n":
            lines.append(line)
            line = []
        start = end
    piece = text[start:]
    if piece and not piece.isspace():
        line.append(piece)
    lines.append(line)
    return lines


def judged_sentences(text: str, min_chars: int) -> list[str]:
    """The pieces of ``text`` that the sentence-quality stage scores, in order: the :func:`sentences` of
    each line, those shorter than ``min_chars`` (stripped) left out."""
    return [piece for line in sentences_by_line(text) for piece in line if len(piece.strip()) >= min_chars]


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation dropped, whitespace collapsed: the key of exact and line dedup."""
    # [^\w\s]|_ is exactly "neither str.isalnum nor str.isspace" (re's \w is isalnum plus "_", \s is isspace);
    # NFKC leaves ASCII text as it is
    if text.isascii():  # its tokens, joined by a space
        return " ".join(tokens(text))
    return " ".join(_NOT_ALNUM_OR_SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())


def normalize_many(texts: list[str | None]) -> list[str | None]:
    """:func:`normalize` of each text (None for None); the ASCII ones cut and joined by Arrow for the whole
    batch at once."""
    plain = [text if text is None or text.isascii() else normalize(text) for text in texts]
    return pc.binary_join(pc.ascii_split_whitespace(_cut_by_arrow(plain)), pa.scalar(" ", pa.large_string())).to_pylist()


def normalize_lines(text: str) -> list[str]:
    """:func:`normalize` of each line of ``text`` (the lines of ``text.split("\\n")``); an ASCII text is
    lower-cased and stripped of punctuation once, as a whole (both act on one character at a time and keep
    the line breaks), and only its whitespace is collapsed line by line."""
    if text.isascii():
        return [" ".join(line.split()) for line in text.lower().translate(_ASCII_PUNCTUATION).split("\n")]
    return [normalize(line) for line in text.split("\n")]
