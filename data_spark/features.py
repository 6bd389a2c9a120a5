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
    """The form of a line as a few binned features (``units`` are its :func:`tokens`)."""
    visible = [c for c in text if not c.isspace()]
    letters = [c for c in visible if c.isalpha()]
    latin = [c for c in letters if c.isascii()]
    words = [u for u in units if u.isascii() and u.isalpha()]
    cjk = [u for u in units if not u.isascii() and len(u) == 1]
    out = [
        f"s:len:{min(len(units), 40) // 5}",
        f"s:alpha:{_decile(len(letters), len(visible))}",
        f"s:digit:{_decile(sum(c.isdigit() for c in visible), len(visible))}",
        f"s:symbol:{_decile(sum(not c.isalnum() for c in visible), len(visible))}",
        f"s:upper:{_decile(sum(c.isupper() for c in latin), len(latin))}",
        f"s:longest:{min(max((len(u) for u in units), default=0), 40) // 6}",
        f"s:end:{_end_class(visible[-1] if visible else '')}",
    ]
    if len(units) >= 4:
        out.append(f"s:unique:{_decile(len(set(units)), len(units))}")
    if len(latin) >= 8:
        out.append(f"s:vowel:{_decile(sum(c in 'aeiouyAEIOUY' for c in latin), len(latin))}")
    if len(words) >= 3:
        out.append(f"s:stop:{_decile(sum(w in _STOP for w in words), len(words))}")
    if len(cjk) >= 4:
        out.append(f"s:zhfunc:{_decile(sum(c in _CJK_FUNCTION for c in cjk), len(cjk))}")
    if any(c in _MOJIBAKE for c in visible):
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
