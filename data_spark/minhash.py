"""MinHash signatures with datasketch's permutations, over whole Arrow batches at a time.

The permutation parameters are taken from datasketch itself (``num_perm``, ``seed``, ``scheme``) and the
permutation arithmetic is numpy's wrap-around integer arithmetic, as datasketch relies on. Two shingle
hashes (``near_dedup.shingle_hash``):

* ``sha1``: the first four bytes of SHA-1 of the shingle's UTF-8 bytes (datasketch's ``sha1_hash32``), so a
  signature computed here equals ``datasketch.MinHash``'s and can be inserted into a datasketch index;
  one Python SHA-1 and one string join per shingle.
* ``fast`` (the default): each distinct token of a batch is hashed once (BLAKE2b), and a shingle's hash is
  a position-weighted sum of its tokens' hashes put through a 64-bit finalizer, computed for every
  shingle of the batch at once in numpy. The shingles are the same sets of tokens as ``sha1``'s (only
  their hash differs), so Jaccard estimates and the banding behave the same; the signatures are not
  datasketch's.

Either way :func:`batch_signatures` turns the flat shingle hashes of a batch into signatures in chunks of
shingles, so no Python runs per shingle and memory stays bounded whatever a document's length.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from haina.data_spark.text import TokenTable, tokens

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)


def shingles(text: str, size: int) -> list[bytes]:
    """Distinct n-token shingles (words; CJK characters count as tokens) as UTF-8 bytes.

    A document with fewer than ``size`` tokens yields its whole token sequence as its one shingle, so
    short documents only match identical short documents instead of all colliding on an empty set.
    """
    units = tokens(text)
    if not units:
        return []
    if len(units) < size:
        return [" ".join(units).encode("utf-8")]
    return list(dict.fromkeys(" ".join(units[i : i + size]).encode("utf-8") for i in range(len(units) - size + 1)))


_TOKEN_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                       0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
                      dtype=np.uint64)  # odd multipliers, one per position in a shingle (then cycled)
# shingles per permutation block: (chunk x num_perm) uint32 is 4 MiB at 256, close to a core's caches; on the
# benchmark's documents 0.020 ms per document against 0.046 with 16 MiB blocks, the same signatures
_CHUNK = 1 << 12


def _mix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 / MurmurHash3 64-bit finalizer: every input bit reaches every output bit."""
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xFF51AFD7ED558CCD)
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xC4CEB9FE1A85EC53)
    return values ^ (values >> np.uint64(33))


def token_hashes(found: TokenTable) -> np.ndarray:
    """uint64 hash of each token of a table (8 bytes of BLAKE2b of its UTF-8 bytes, little-endian), taken once
    per distinct token: no Python integer is made per token (numpy converts a list of big ints slowly)."""
    digests = b"".join(hashlib.blake2b(unit.encode("utf-8"), digest_size=8).digest() for unit in found.distinct)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)[found.token]


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def fast_shingle_hashes(texts: list[str | None], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct uint32 shingle hashes of every text, concatenated and sorted within each text; offsets,
    ``len(texts) + 1``): the ``fast`` hash, for the whole batch in a few numpy passes. A text with fewer
    than ``size`` tokens has its whole token sequence as its one shingle (as :func:`shingles`); one without
    tokens has none."""
    found = TokenTable.of_texts(texts)
    if not len(found.token):
        return np.zeros(0, np.uint32), np.zeros(len(texts) + 1, np.int64)
    h = token_hashes(found)
    lengths, doc = found.lengths, found.row
    starts = _offsets(lengths)
    with np.errstate(over="ignore"):
        # every window of ``size`` tokens of the batch; those that run past their text's end are dropped
        windows = max(0, len(h) - size + 1)
        acc = np.full(windows, np.uint64(size), dtype=np.uint64)  # a short text's one shingle differs from any full one
        for j in range(size):
            acc += h[j : j + windows] * _TOKEN_MIX[j % len(_TOKEN_MIX)]
        inside = np.arange(windows) + size <= starts[1:][doc[:windows]]
        shingle_doc, shingle = doc[:windows][inside], acc[inside]
        short = np.flatnonzero((lengths > 0) & (lengths < size))
        if len(short):
            extra = np.zeros(len(short), dtype=np.uint64) + lengths[short].astype(np.uint64)
            for j in range(size - 1):
                has = lengths[short] > j
                extra[has] += h[starts[short][has] + j] * _TOKEN_MIX[j % len(_TOKEN_MIX)]
            shingle_doc, shingle = np.concatenate([shingle_doc, short]), np.concatenate([shingle, extra])
        values = (_mix64(shingle) >> np.uint64(32)).astype(np.uint64)
    keys = np.sort((shingle_doc.astype(np.uint64) << np.uint64(32)) | values)  # by text, then value
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # distinct (a sort beats np.unique's hash table here)
    counts = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=len(texts))
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), _offsets(counts)


def sha1_shingle_hashes(texts: list[str | None], size: int, hasher: MinHasher) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fast_shingle_hashes`' layout with datasketch's ``sha1_hash32`` of each distinct shingle."""
    parts: list[np.ndarray] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        hv = np.unique(hasher.hashes(shingles(text or "", size)))
        parts.append(hv)
        counts[i] = len(hv)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint32)), offsets


def _fmix32(values: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer, which datasketch's affine scheme applies before permuting."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


@dataclass(frozen=True)
class MinHasher:
    """Permutations of one (num_perm, seed, scheme); picklable, so it ships to executors as is."""

    num_perm: int
    seed: int
    scheme: str
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def create(cls, num_perm: int, seed: int, scheme: str = "affine32") -> MinHasher:
        from datasketch import MinHash

        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=scheme).permutations
        return cls(num_perm, seed, scheme, np.asarray(a), np.asarray(b))

    def hashes(self, items: list[bytes]) -> np.ndarray:
        """datasketch's ``sha1_hash32`` of every item: the first four bytes of SHA-1, little-endian."""
        return np.fromiter(
            (int.from_bytes(hashlib.sha1(item).digest()[:4], "little") for item in items),
            dtype=np.uint32,
            count=len(items),
        )

    def signature(self, items: list[bytes], hv: np.ndarray | None = None) -> np.ndarray | None:
        """uint32 signature of a set of byte strings; None for the empty set (never indexed)."""
        if not items:
            return None
        hv = self.hashes(items) if hv is None else hv
        return self.permuted(hv).min(axis=0).astype(np.uint32)

    def permuted(self, hv: np.ndarray) -> np.ndarray:
        """``(len(hv), num_perm)``: every permutation of every uint32 hash value (datasketch's arithmetic)."""
        return self.permuted_t(hv).T

    def permuted_t(self, hv: np.ndarray) -> np.ndarray:
        """``(num_perm, len(hv))``, :meth:`permuted` transposed (a text's values contiguous per permutation)."""
        with np.errstate(over="ignore"):
            if self.scheme == "legacy":
                wide = hv.astype(np.uint64)[None, :]
                return (((self.a[:, None] * wide + self.b[:, None]) % _MERSENNE) & _MAX32).astype(np.uint32)
            a, b = self.a.astype(np.uint32)[:, None], self.b.astype(np.uint32)[:, None]
            return a * _fmix32(hv.astype(np.uint32))[None, :] + b


def batch_signatures(hasher: MinHasher, hv: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``(texts, num_perm)`` uint32 signatures of the shingle hashes ``hv[offsets[i]:offsets[i+1]]`` of
    each text (rows of texts without shingles are all ``0xFFFFFFFF``: never used, see the callers)."""
    docs = len(offsets) - 1
    out = np.full((docs, hasher.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    doc_of = np.repeat(np.arange(docs), np.diff(offsets))
    for start in range(0, len(hv), _CHUNK):
        block = hasher.permuted_t(hv[start : start + _CHUNK])  # (num_perm, chunk): reduce along rows
        owners = doc_of[start : start + _CHUNK]
        cuts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        mins = np.minimum.reduceat(block, cuts, axis=1).T
        docs_here = owners[cuts]
        out[docs_here] = np.minimum(out[docs_here], mins)  # a text cut by the chunk edge: both halves
    return out


def lsh_params(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive/negative error, from datasketch."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, fp_weight, fn_weight)


_BAND_SEED = np.uint64(0x243F6A8885A308D3)  # the first digits of pi: any fixed odd constant
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def band_key_matrix(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(texts, bands)`` signed 64-bit band keys of uint32 ``signatures`` (one row per text), for the
    whole batch at once in numpy: band ``i`` starts from ``mix64(seed + i * golden)`` (the band is part
    of the key, as datasketch keeps a table per band), and each of its rows ``v`` (columns
    ``i * rows .. (i + 1) * rows``) is folded in as ``state = mix64(state ^ v)``. ``mix64`` is a bijection
    of 64-bit words, so two bands get one key only when their rows are equal, or by a 64-bit chance."""
    n = len(signatures)
    values = np.asarray(signatures, dtype=np.uint32)[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    with np.errstate(over="ignore"):
        start = _mix64(_BAND_SEED + np.arange(bands, dtype=np.uint64) * _GOLDEN)
        state = np.broadcast_to(start, (n, bands)).copy()
        for j in range(rows):
            state = _mix64(state ^ values[:, :, j])
    return state.view(np.int64)


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """The band keys of one signature (:func:`band_key_matrix`), as Python ints."""
    return band_key_matrix(np.asarray(signature, dtype=np.uint32)[None, :], bands, rows)[0].tolist()


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The LSH S-curve: probability that two sets of this Jaccard similarity share a band."""
    return 1.0 - math.pow(1.0 - math.pow(similarity, rows), bands)
