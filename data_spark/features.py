"""Hashed n-gram features: the shared input of the line classifiers and the dense document embeddings.

Hashing (CRC-32, stable across processes, unlike Python's ``hash``) needs no vocabulary pass over the
corpus, so a batch is featurised on its own. Words and CJK characters give uni- and bigrams; runs of
punctuation, URLs and shouting add the shape features that separate spam from prose in any language.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from haina.data_spark.text import tokens

_PUNCT_RUN = re.compile(r"[^\w\s]{2,}")
_URL = re.compile(r"https?://|www\.")
_CAPS = re.compile(r"\b[A-Z]{3,}\b")


def _bucket(feature: str, size: int) -> int:
    return zlib.crc32(feature.encode("utf-8")) % size


def featurize(text: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique hashed feature ids and L2-normalised log counts of one text."""
    units = tokens(text)
    grams = [f"u:{u}" for u in units] + [f"b:{a} {b}" for a, b in zip(units, units[1:], strict=False)]
    grams += [f"p:{run[:3]}" for run in _PUNCT_RUN.findall(text)]
    grams += ["url"] * len(_URL.findall(text)) + ["caps"] * len(_CAPS.findall(text))
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
