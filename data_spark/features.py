"""Hashed n-gram features: the shared input of the line classifiers and the dense document embeddings.

Hashing (CRC-32, stable across processes, unlike Python's ``hash``) needs no vocabulary pass over the
corpus, so a batch is featurised on its own. Words and CJK characters give uni- and bigrams; runs of
punctuation, URLs and shouting add the shape features that separate spam from prose in any language.
The sentence-quality model also asks for :func:`shape_features` (``shape=True``): binned shares of
letters, digits, symbols and capitals, token repetition, vowels, stop words, the longest token and the
last character, which let a linear model tell random characters, base64 runs and keyword stuffing from
prose by their form rather than by the (random) words they happen to hash to.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from haina.data_spark.text import tokens

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


class _Buckets:
    """:func:`featurize`'s feature ids for many texts: the CRC-32 of ``u:TOKEN`` once per distinct token, and
    that of ``b:A B`` continued from a cached ``b:A`` state over a cached `` B`` (CRC-32 runs over the bytes
    in order, so this is the CRC of the whole string), so no feature string is built for a word's gram."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.uni: dict[str, int] = {}
        self.head: dict[str, int] = {}
        self.tail: dict[str, bytes] = {}
        self.other: dict[str, int] = {}

    def _learn(self, units: list[str]) -> None:
        for u in set(units).difference(self.uni):
            raw = u.encode("utf-8")
            self.uni[u] = zlib.crc32(b"u:" + raw) % self.size
            self.head[u] = zlib.crc32(b"b:" + raw)
            self.tail[u] = b" " + raw

    def grams(self, text: str, units: list[str], shape: bool | list[str]) -> list[int]:
        """The ids of ``featurize(text)``'s grams, in its order (duplicates kept); ``shape`` may be the
        text's :func:`shape_features`, computed already."""
        if units:
            self._learn(units)
        size, crc = self.size, zlib.crc32
        ids = list(map(self.uni.__getitem__, units))
        ids += [crc(t, h) % size for h, t in zip(map(self.head.__getitem__, units),
                                                map(self.tail.__getitem__, units[1:]), strict=False)]
        rest = [f"p:{run[:3]}" for run in _PUNCT_RUN.findall(text)]
        rest += ["url"] * len(_URL.findall(text)) + ["caps"] * len(_CAPS.findall(text))
        if shape is True:
            rest += shape_features(text, units)
        elif shape:
            rest += shape
        if not ids and not rest:
            rest = ["empty"]
        for gram in rest:
            found = self.other.get(gram)
            if found is None:
                found = self.other[gram] = _bucket(gram, size)
            ids.append(found)
        return ids


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


def shape_batch(texts: list[str], units: list[list[str]]) -> list[list[str]]:
    """:func:`shape_features` of every text, the character counts taken for all texts at once in numpy
    (one code-point array, class flags looked up, summed per text); the same features, text for text."""
    if not texts:
        return []
    big = "".join(texts)
    codes = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    flags = _flags()[codes]
    bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=bounds[1:])
    ascii_ = codes < 128

    def per_text(mask: np.ndarray) -> np.ndarray:
        total = np.zeros(len(mask) + 1, dtype=np.int64)
        np.cumsum(mask, out=total[1:])
        return total[bounds[1:]] - total[bounds[:-1]]

    visible = (flags & _SPACE) == 0
    alpha = (flags & _ALPHA) != 0
    latin_mask = alpha & ascii_
    n_visible, n_letters = per_text(visible), per_text(alpha)
    n_digits, n_alnum = per_text((flags & _DIGIT) != 0), per_text((flags & _ALNUM) != 0)
    n_latin, n_upper = per_text(latin_mask), per_text(latin_mask & ((flags & _UPPER) != 0))
    n_vowel, n_moji = per_text(latin_mask & ((flags & _VOWEL) != 0)), per_text((flags & _MOJI) != 0)
    last_visible = np.maximum.accumulate(np.where(visible, np.arange(len(codes)), -1)) if len(codes) else codes
    out = []
    for i, found in enumerate(units):
        nv, nl = int(n_visible[i]), int(n_latin[i])
        end = big[last_visible[bounds[i + 1] - 1]] if nv else ""
        words = [u for u in found if u.isascii() and u.isalpha()]
        cjk = [u for u in found if len(u) == 1 and not u.isascii()]
        row = [
            f"s:len:{min(len(found), 40) // 5}",
            f"s:alpha:{_decile(int(n_letters[i]), nv)}",
            f"s:digit:{_decile(int(n_digits[i]), nv)}",
            f"s:symbol:{_decile(nv - int(n_alnum[i]), nv)}",
            f"s:upper:{_decile(int(n_upper[i]), nl)}",
            f"s:longest:{min(max(map(len, found), default=0), 40) // 6}",
            f"s:end:{_end_class(end)}",
        ]
        if len(found) >= 4:
            row.append(f"s:unique:{_decile(len(set(found)), len(found))}")
        if nl >= 8:
            row.append(f"s:vowel:{_decile(int(n_vowel[i]), nl)}")
        if len(words) >= 3:
            row.append(f"s:stop:{_decile(sum(w in _STOP for w in words), len(words))}")
        if len(cjk) >= 4:
            row.append(f"s:zhfunc:{_decile(sum(c in _CJK_FUNCTION for c in cjk), len(cjk))}")
        if n_moji[i]:
            row.append("s:mojibake")
        out.append(row)
    return out


def feature_rows(texts: list[str], size: int, shape: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts ``(values, ids, starts)`` of :func:`featurize` applied to every text: the same sorted ids and
    the same values (log counts over their norm, in float64, equal up to rounding) for each row, built for
    the whole list at once."""
    buckets = _Buckets(size)
    flat: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    index: dict[str, int] = {}  # a line repeated within the list (boilerplate, copies) is featurised once
    distinct = [t for t in texts if t not in index and index.setdefault(t, len(index)) is not None]
    units = [tokens(t) for t in distinct]
    shapes = shape_batch(distinct, units) if shape else [False] * len(distinct)
    grams = [buckets.grams(t, u, sh) for t, u, sh in zip(distinct, units, shapes, strict=True)]
    for i, text in enumerate(texts):
        ids = grams[index[text]]
        flat += ids
        lengths[i] = len(ids)
    if not flat:
        return np.zeros(0), np.zeros(0, np.int64), np.zeros(len(texts) + 1, np.int64)
    row = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    key = row * size + np.asarray(flat, dtype=np.int64)
    unique, counts = np.unique(key, return_counts=True)
    rows, ids = np.divmod(unique, size)
    values = np.log1p(counts.astype(np.float64))
    starts = np.searchsorted(rows, np.arange(len(texts) + 1))
    norms = np.sqrt(np.add.reduceat(values * values, starts[:-1])) if len(values) else values
    values /= np.repeat(norms, np.diff(starts))
    return values, ids, starts


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
    from scipy import sparse

    if not texts:
        return np.zeros((0, matrix.shape[1]), np.float32)
    values, ids, starts = feature_rows(texts, matrix.shape[0])
    rows = sparse.csr_matrix((values.astype(np.float32), ids, starts), shape=(len(texts), matrix.shape[0]))
    vectors = np.asarray(rows @ matrix, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=vectors, where=norms > 0)
