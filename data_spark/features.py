"""Hashed n-gram features: the shared input of the line classifiers and the dense document embeddings.

Hashing (CRC-32, stable across processes, unlike Python's ``hash``) needs no vocabulary pass over the
corpus, so a batch is featurised on its own. Words and CJK characters give uni- and bigrams; runs of
punctuation, URLs and shouting add the shape features that separate spam from prose in any language.
The sentence-quality model also asks for :func:`shape_features` (``shape=True``): binned shares of
letters, digits, symbols and capitals, token repetition, vowels, stop words, the longest token and the
last character, which let a linear model tell random characters, base64 runs and keyword stuffing from
prose by their form rather than by the (random) words they happen to hash to.

:func:`featurize` defines the features of one text; :func:`feature_rows` gives the same ids and values for
a whole batch with no Python per gram: tokens dictionary-encoded once, uni- and bigram CRCs in numpy, the
shape features from per-character class counts and per-token measures summed per row, the punctuation,
URL and shouting grams from runs and matches in the batch's code points.
"""

from __future__ import annotations

import re
import zlib
from typing import NamedTuple

import numpy as np
from scipy import sparse

from haina.data_spark.text import TokenTable, approx_tokens, tokens

_PUNCT_RUN = re.compile(r"[^\w\s]{2,}")
_URL = re.compile(r"https?://|www\.")
_CAPS = re.compile(r"\b[A-Z]{3,}\b")
_STOP = frozenset([
    "the", "a", "an", "of", "to", "in", "and", "or", "is", "are", "was", "be", "it", "that", "this", "for", "on",
    "with", "as", "by", "not", "from", "at", "can",
])
_CJK_FUNCTION = frozenset("的了是在和有我不这也就人都而及与着或一个上们到说为")
_MOJIBAKE = frozenset("ÃÂâ€\ufffd锟")  # UTF-8 read as cp1252; GBK's replacement run


def _bucket(feature: str, size: int) -> int:
    return zlib.crc32(feature.encode("utf-8")) % size


def _decile(part: int, whole: int) -> int:
    return min(9, 10 * part // whole) if whole else -1


def shape_features(text: str, units: list[str]) -> list[str]:
    """The form of a line as a few binned features (``units`` are its :func:`tokens`).

    Counted with ``str`` methods over whole strings (``str.split()`` drops exactly the ``isspace``
    characters) rather than a Python loop per character."""
    visible = "".join(text.split())
    letters = "".join(filter(str.isalpha, visible))
    latin = "".join(filter(str.isascii, letters))
    words = [u for u in units if u.isascii() and u.isalpha()]
    cjk = [u for u in units if len(u) == 1 and not u.isascii()]
    out = [
        f"s:len:{min(len(units), 40) // 5}",
        f"s:alpha:{_decile(len(letters), len(visible))}",
        f"s:digit:{_decile(sum(map(str.isdigit, visible)), len(visible))}",
        f"s:symbol:{_decile(len(visible) - sum(map(str.isalnum, visible)), len(visible))}",
        f"s:upper:{_decile(sum(map(str.isupper, latin)), len(latin))}",
        f"s:longest:{min(max(map(len, units), default=0), 40) // 6}",
        f"s:end:{_end_class(visible[-1] if visible else '')}",
    ]
    if len(units) >= 4:
        out.append(f"s:unique:{_decile(len(set(units)), len(units))}")
    if len(latin) >= 8:
        out.append(f"s:vowel:{_decile(sum(map(latin.count, 'aeiouyAEIOUY')), len(latin))}")
    if len(words) >= 3:
        out.append(f"s:stop:{_decile(sum(w in _STOP for w in words), len(words))}")
    if len(cjk) >= 4:
        out.append(f"s:zhfunc:{_decile(sum(c in _CJK_FUNCTION for c in cjk), len(cjk))}")
    if not _MOJIBAKE.isdisjoint(visible):
        out.append("s:mojibake")
    return out


def _end_class(char: str) -> str:
    if char in ".!?。！？":
        return "stop"
    if char in ",;:，；：、":
        return "pause"
    if char.isalnum():
        return "word"
    return "symbol" if char else "none"


def featurize(text: str, size: int, shape: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique hashed feature ids and L2-normalised log counts of one text (with
    :func:`shape_features` when ``shape``)."""
    units = tokens(text)
    grams = [f"u:{u}" for u in units] + [f"b:{a} {b}" for a, b in zip(units, units[1:], strict=False)]
    grams += [f"p:{run[:3]}" for run in _PUNCT_RUN.findall(text)]
    grams += ["url"] * len(_URL.findall(text)) + ["caps"] * len(_CAPS.findall(text))
    if shape:
        grams += shape_features(text, units)
    if not grams:
        grams = ["empty"]
    ids = np.fromiter((_bucket(g, size) for g in grams), dtype=np.int64, count=len(grams))
    unique, counts = np.unique(ids, return_counts=True)
    values = np.log1p(counts.astype(np.float64))
    values /= np.linalg.norm(values)
    return unique, values


_SHIFTS: dict[int, np.ndarray] = {}


def _shift_table(n: int) -> np.ndarray:
    """``(4, 256)`` uint32: the CRC-32 register advanced over ``n`` zero bytes, as a linear map, one table
    per byte of the register. zlib's ``crc32(data, c)`` is ``shift_n(c) ^ crc32(data, 0)`` for any ``n``
    bytes of data (the conditioning cancels out), and ``shift_n`` is linear over GF(2), so it is the XOR
    of one lookup per byte of ``c``."""
    table = _SHIFTS.get(n)
    if table is None:
        zeros = bytes(n)
        base = zlib.crc32(zeros, 0)
        table = np.array([[zlib.crc32(zeros, v << (8 * k)) ^ base for v in range(256)] for k in range(4)],
                         dtype=np.uint32)
        _SHIFTS[n] = table
    return table


def _word_grams(found: TokenTable, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, feature id) of every ``u:TOKEN`` and ``b:A B`` gram of each row's tokens, for all rows at once.

    The CRC-32 of ``u:TOKEN``, of ``b:A`` and of `` B`` is taken once per distinct token; a bigram's CRC is
    that of ``b:A`` continued over `` B`` (:func:`_shift_table`), for every bigram of the batch in numpy,
    so no feature string is built and no Python runs per gram."""
    if not len(found.token):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    raw = [u.encode("utf-8") for u in found.distinct]
    uni = np.array([zlib.crc32(b"u:" + r) % size for r in raw], dtype=np.int64)
    head = np.array([zlib.crc32(b"b:" + r) for r in raw], dtype=np.uint32)
    tail = np.array([zlib.crc32(b" " + r) for r in raw], dtype=np.uint32)
    tail_len = np.array([len(r) + 1 for r in raw], dtype=np.int64)
    row, token = found.row, found.token
    pair = np.flatnonzero(row[:-1] == row[1:])  # a bigram: two tokens of one row
    a, b = token[pair], token[pair + 1]
    shifts, which = np.unique(tail_len[b], return_inverse=True)
    tables = np.stack([_shift_table(int(n)) for n in shifts]) if len(shifts) else np.zeros((0, 4, 256), np.uint32)
    c = head[a]
    crc = tail[b].copy()
    for k in range(4):
        crc ^= tables[which, k, (c >> np.uint32(8 * k)) & np.uint32(0xFF)]
    bigram = (crc % np.uint32(size)).astype(np.int64)
    return np.concatenate([row, row[pair]]), np.concatenate([uni[token], bigram])


_FLAGS: np.ndarray | None = None
_SPACE, _ALPHA, _DIGIT, _ALNUM, _UPPER, _VOWEL, _MOJI = 1, 2, 4, 8, 16, 32, 64


def _flags() -> np.ndarray:
    """One byte of character classes per code point (str.isspace, isalpha, isdigit, isalnum, isupper, the
    Latin vowels, the mojibake marks), built once per process from the ``str`` methods themselves."""
    global _FLAGS
    if _FLAGS is None:
        every = "".join(map(chr, range(0x110000)))
        table = np.zeros(0x110000, dtype=np.uint8)
        for bit, test in ((_SPACE, str.isspace), (_ALPHA, str.isalpha), (_DIGIT, str.isdigit),
                          (_ALNUM, str.isalnum), (_UPPER, str.isupper)):
            table |= np.frombuffer(bytes(map(test, every)), dtype=np.uint8) * np.uint8(bit)
        table[[ord(c) for c in "aeiouyAEIOUY"]] |= _VOWEL
        table[[ord(c) for c in _MOJIBAKE]] |= _MOJI
        _FLAGS = table
    return _FLAGS


_SHAPE_IDS: dict[int, dict[str, np.ndarray]] = {}
_END_CLASSES = ("none", "stop", "pause", "word", "symbol")


def _shape_id_tables(size: int) -> dict[str, np.ndarray]:
    """Feature id of ``s:NAME:VALUE`` for VALUE -1 .. 40 (at index VALUE + 1), and of the end classes."""
    tables = _SHAPE_IDS.get(size)
    if tables is None:
        tables = {name: np.array([_bucket(f"s:{name}:{v}", size) for v in range(-1, 41)], dtype=np.int64)
                  for name in ("len", "alpha", "digit", "symbol", "upper", "longest", "unique", "vowel", "stop",
                               "zhfunc")}
        tables["end"] = np.array([_bucket(f"s:end:{c}", size) for c in _END_CLASSES], dtype=np.int64)
        tables["mojibake"] = np.array([_bucket("s:mojibake", size)], dtype=np.int64)
        _SHAPE_IDS[size] = tables
    return tables


def _deciles(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """:func:`_decile` elementwise."""
    out = np.full(len(part), -1, dtype=np.int64)
    ok = whole > 0
    out[ok] = np.minimum(9, (10 * part[ok]) // whole[ok])
    return out


class _Chars:
    """The code points of many texts laid end to end, their :func:`_flags`, and each text's bounds: one pass
    over the characters of a batch, shared by the shape features and the gate of the regex grams."""

    def __init__(self, texts: list[str]) -> None:
        self.codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        self.flags = _flags()[self.codes]
        self.bounds = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in texts], out=self.bounds[1:])

    def per_text(self, mask: np.ndarray) -> np.ndarray:
        """How many of each text's characters ``mask`` holds: one segmented sum over the texts that have
        characters (half the time of differencing a running total of int64 over the whole batch)."""
        out = np.zeros(len(self.bounds) - 1, dtype=np.int64)
        filled = np.flatnonzero(np.diff(self.bounds) > 0)
        if len(filled):
            out[filled] = np.add.reduceat(mask, self.bounds[filled], dtype=np.int64)
        return out

    def text_of(self, positions: np.ndarray) -> np.ndarray:
        """The text each character position belongs to."""
        return np.searchsorted(self.bounds, positions, side="right") - 1

    def runs(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first position, length) of every maximal run of characters in ``mask`` within one text (a run
        stops where its text does, though the texts lie end to end)."""
        edge = np.zeros(len(self.codes) + 1, dtype=bool)
        edge[self.bounds] = True  # a text starts here (and the one before ends just before)
        before = np.r_[False, mask[:-1]] & ~edge[:-1]
        after = np.r_[mask[1:], False] & ~edge[1:]
        first, last = np.flatnonzero(mask & ~before), np.flatnonzero(mask & ~after)
        return first, last - first + 1

    def occurrences(self, part: str) -> np.ndarray:
        """The positions where ``part`` starts inside one text (it cannot overlap itself)."""
        n = len(self.codes) - len(part) + 1
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        hit = self.codes[:n] == ord(part[0])
        for k, char in enumerate(part[1:], start=1):
            hit &= self.codes[k : n + k] == ord(char)
        found = np.flatnonzero(hit)
        return found[self.text_of(found) == self.text_of(found + len(part) - 1)]

    def symbols(self) -> np.ndarray:
        """Which characters are symbols in ``approx_tokens``' sense: neither alphanumeric, ``_`` nor space."""
        return ((self.flags & (_SPACE | _ALNUM)) == 0) & (self.codes != ord("_"))


_LOW21 = (1 << 21) - 1  # a code point's bits (U+10FFFF < 2 ** 21)
_NO_CHAR = _LOW21  # above every code point: a punctuation run of two characters has no third


def _other_gram_rows(chars: _Chars, symbol: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, feature id) of the grams of :func:`featurize` that are neither words, word pairs nor shape
    features, for every text, from the code points in numpy: the maximal
    runs of two or more symbols (``[^\\w\\s]{2,}``, each a ``p:`` gram of its first three characters),
    the URL starts (``https?://``, ``www.``) and the maximal runs of three or more ASCII capitals with no
    word character on either side (``\\b[A-Z]{3,}\\b``). The regexes themselves, a call per text, took a
    quarter of the time of featurising whole documents."""
    codes, rows, ids = chars.codes, [], []
    first, length = chars.runs(symbol)
    first, length = first[length >= 2], length[length >= 2]
    if len(first):
        third = np.where(length >= 3, codes[np.minimum(first + 2, len(codes) - 1)], _NO_CHAR).astype(np.int64)
        key = (codes[first].astype(np.int64) << 42) | (codes[first + 1].astype(np.int64) << 21) | third
        distinct, which = np.unique(key, return_inverse=True)
        gram_ids = np.array([_bucket("p:" + "".join(chr(c) for c in (k >> 42, (k >> 21) & _LOW21, k & _LOW21)
                                                    if c != _NO_CHAR), size) for k in distinct.tolist()],
                            dtype=np.int64)
        rows.append(chars.text_of(first))
        ids.append(gram_ids[which.reshape(-1)])
    urls = np.concatenate([chars.occurrences(p) for p in ("http://", "https://", "www.")])
    rows.append(chars.text_of(urls))
    ids.append(np.full(len(urls), _bucket("url", size), dtype=np.int64))
    capital = (codes >= ord("A")) & (codes <= ord("Z"))
    word = ((chars.flags & _ALNUM) != 0) | (codes == ord("_"))
    first, length = chars.runs(capital)
    last = first + length - 1
    starts_text = np.isin(first, chars.bounds)
    ends_text = np.isin(last + 1, chars.bounds)
    free = (starts_text | ~word[np.maximum(first - 1, 0)]) & (ends_text | ~word[np.minimum(last + 1, len(codes) - 1)])
    shouts = first[(length >= 3) & free]
    rows.append(chars.text_of(shouts))
    ids.append(np.full(len(shouts), _bucket("caps", size), dtype=np.int64))
    return np.concatenate(rows).astype(np.int64), np.concatenate(ids)


def _shape_grams(texts: list[str], chars: _Chars, found: TokenTable, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, feature id) of :func:`shape_features` of every text, the same features text for text, all in
    numpy: the character classes of one code-point array for all texts, summed per text, and the token
    measures from the tokens' dictionary (a value per distinct token, summed per row)."""
    n = len(texts)
    codes, flags, bounds, per_text = chars.codes, chars.flags, chars.bounds, chars.per_text
    ascii_ = codes < 128

    visible = (flags & _SPACE) == 0
    alpha = (flags & _ALPHA) != 0
    latin_mask = alpha & ascii_
    n_visible, n_letters = per_text(visible), per_text(alpha)
    n_digits, n_alnum = per_text((flags & _DIGIT) != 0), per_text((flags & _ALNUM) != 0)
    n_latin, n_upper = per_text(latin_mask), per_text(latin_mask & ((flags & _UPPER) != 0))
    n_vowel, n_moji = per_text(latin_mask & ((flags & _VOWEL) != 0)), per_text((flags & _MOJI) != 0)
    # the class of each text's last visible character ("stop" without one: _end_class("") finds "" in
    # its list of full stops)
    end = np.ones(n, dtype=np.int64)
    if len(codes):
        last_visible = np.maximum.accumulate(np.where(visible, np.arange(len(codes)), -1))
        has = n_visible > 0
        last = codes[last_visible[bounds[1:][has] - 1]]
        cls = np.where((_flags()[last] & _ALNUM) != 0, 3, 4)
        cls = np.where(np.isin(last, [ord(c) for c in ",;:，；：、"]), 2, cls)
        end[has] = np.where(np.isin(last, [ord(c) for c in ".!?。！？"]), 1, cls)
    # token measures
    distinct = found.distinct
    n_tokens = found.lengths
    longest = np.zeros(n, dtype=np.int64)
    n_unique = np.zeros(n, dtype=np.int64)
    if len(found.token):
        lengths = np.fromiter(map(len, distinct), dtype=np.int64, count=len(distinct))
        np.maximum.at(longest, found.row, lengths[found.token])
        # distinct (row, token) pairs by a sort: numpy 2.4's np.unique without counts takes its hash-table
        # path, sixty times slower on a batch's tokens (1.1 s against 0.02 s for 1.8 million)
        pairs = np.sort(found.row * len(distinct) + found.token)
        pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
        n_unique = np.bincount(pairs // len(distinct), minlength=n).astype(np.int64)
    word = np.array([u.isascii() and u.isalpha() for u in distinct], dtype=np.int64)
    cjk = np.array([len(u) == 1 and not u.isascii() for u in distinct], dtype=np.int64)
    n_words, n_cjk = found.per_row(word), found.per_row(cjk)
    n_stop = found.per_row(word * np.array([u in _STOP for u in distinct], dtype=np.int64))
    n_zh = found.per_row(cjk * np.array([u in _CJK_FUNCTION for u in distinct], dtype=np.int64))
    ids = _shape_id_tables(size)
    every = np.arange(n, dtype=np.int64)
    rows, out = [], []

    def add(name: str, values: np.ndarray, where: np.ndarray | None = None) -> None:
        chosen = every if where is None else np.flatnonzero(where)
        rows.append(chosen)
        out.append(ids[name][(values if where is None else values[where]) + 1])

    add("len", np.minimum(n_tokens, 40) // 5)
    add("alpha", _deciles(n_letters, n_visible))
    add("digit", _deciles(n_digits, n_visible))
    add("symbol", _deciles(n_visible - n_alnum, n_visible))
    add("upper", _deciles(n_upper, n_latin))
    add("longest", np.minimum(longest, 40) // 6)
    rows.append(every)
    out.append(ids["end"][end])
    add("unique", _deciles(n_unique, n_tokens), n_tokens >= 4)
    add("vowel", _deciles(n_vowel, n_latin), n_latin >= 8)
    add("stop", _deciles(n_stop, n_words), n_words >= 3)
    add("zhfunc", _deciles(n_zh, n_cjk), n_cjk >= 4)
    moji = np.flatnonzero(n_moji > 0)
    rows.append(moji)
    out.append(np.repeat(ids["mojibake"], len(moji)))
    return np.concatenate(rows), np.concatenate(out)


class FeatureRows(NamedTuple):
    """CSR parts of the features of many texts, and each text's ``approx_tokens`` (taken on the way)."""

    values: np.ndarray
    ids: np.ndarray
    starts: np.ndarray
    approx_tokens: np.ndarray

    def matrix(self, size: int, dtype: type = np.float64) -> sparse.csr_matrix:
        """The features as a ``(texts, size)`` sparse matrix."""
        return sparse.csr_matrix((self.values.astype(dtype), self.ids, self.starts), shape=(len(self.starts) - 1, size))


def _approx_tokens(texts: list[str], found: TokenTable, chars: _Chars, symbol: np.ndarray) -> np.ndarray:
    """:func:`~haina.data_spark.text.approx_tokens` of each text from what featurising found: its tokens
    (of the lower-cased text, which splits an ASCII text exactly as the text itself) and its symbols; a
    text with other characters is counted on its own (lower-casing may lengthen one, as ``İ``)."""
    out = found.lengths + chars.per_text(symbol)
    for i, text in enumerate(texts):
        if not text.isascii():
            out[i] = approx_tokens(text)
    return out


def feature_rows(texts: list[str], size: int, shape: bool = False) -> FeatureRows:
    """CSR parts ``(values, ids, starts)`` of :func:`featurize` applied to every text: the same sorted ids and
    the same values (log counts over their norm, in float64, equal up to rounding) for each row, built for
    the whole list at once, and each text's ``approx_tokens``. A text repeated within the list
    (boilerplate, copies) is featurised once."""
    index: dict[str, int] = {}
    distinct = [t for t in texts if t not in index and index.setdefault(t, len(index)) is not None]
    found = TokenTable.of_texts(distinct)
    word_row, word_id = _word_grams(found, size)
    chars = _Chars(distinct)
    symbol = chars.symbols()
    ntok = _approx_tokens(distinct, found, chars, symbol)
    if shape and distinct:
        shape_row, shape_id = _shape_grams(distinct, chars, found, size)
        word_row, word_id = np.concatenate([word_row, shape_row]), np.concatenate([word_id, shape_id])
    rest_rows, rest_ids = _other_gram_rows(chars, symbol, size)
    if not shape:  # a text without grams gets "empty" (a text always has shape features)
        bare = np.flatnonzero((found.lengths == 0) & (np.bincount(rest_rows, minlength=len(distinct)) == 0))
        rest_rows = np.concatenate([rest_rows, bare])
        rest_ids = np.concatenate([rest_ids, np.full(len(bare), _bucket("empty", size), dtype=np.int64)])
    which = np.fromiter((index[t] for t in texts), dtype=np.int64, count=len(texts))
    if not len(word_id) and not len(rest_ids):
        return FeatureRows(np.zeros(0), np.zeros(0, np.int64), np.zeros(len(texts) + 1, np.int64), ntok[which])
    key = np.concatenate([word_row, rest_rows]) * size + np.concatenate([word_id, rest_ids])
    unique, counts = np.unique(key, return_counts=True)
    rows, ids = np.divmod(unique, size)
    values = np.log1p(counts.astype(np.float64))
    starts = np.searchsorted(rows, np.arange(len(distinct) + 1))
    norms = np.sqrt(np.add.reduceat(values * values, starts[:-1])) if len(values) else values
    values /= np.repeat(norms, np.diff(starts))
    if len(distinct) == len(texts):
        return FeatureRows(values, ids, starts, ntok)
    # every text's row is its distinct text's row
    sizes = np.diff(starts)[which]
    out_starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out_starts[1:])
    source = np.repeat(starts[:-1][which] - out_starts[:-1], sizes) + np.arange(out_starts[-1])
    return FeatureRows(values[source], ids[source], out_starts, ntok[which])


def projection(size: int, dim: int, seed: int) -> np.ndarray:
    """A fixed Gaussian random projection (Johnson-Lindenstrauss) from hashed features to ``dim``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((size, dim)) / np.sqrt(dim)).astype(np.float32)


def embed(text: str, matrix: np.ndarray) -> np.ndarray:
    """Unit-length dense embedding of ``text`` under the projection ``matrix``."""
    ids, values = featurize(text, matrix.shape[0])
    vector = values.astype(np.float32) @ matrix[ids]
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else vector


def embed_many(texts: list[str], matrix: np.ndarray) -> np.ndarray:
    """:func:`embed` of every text, ``(len(texts), dim)``, through one sparse product for the whole list."""
    if not texts:
        return np.zeros((0, matrix.shape[1]), np.float32)
    vectors = np.asarray(feature_rows(texts, matrix.shape[0]).matrix(matrix.shape[0], np.float32) @ matrix,
                         dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=vectors, where=norms > 0)
