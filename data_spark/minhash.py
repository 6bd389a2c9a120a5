"""MinHash signatures identical to datasketch's ``MinHash`` for the same num_perm, seed and scheme.

Shingles are hashed with the first four bytes of SHA-1 (datasketch's ``sha1_hash32``), and the
permutation parameters are taken from datasketch itself, so a signature computed here on an executor
can be compared with, or inserted into, a datasketch index. The permutation arithmetic is vectorised
over all shingles of a document with numpy's wrap-around integer semantics, as datasketch relies on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from haina.data_spark.text import tokens

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
        with np.errstate(over="ignore"):
            if self.scheme == "legacy":
                wide = hv.astype(np.uint64)[:, None]
                phv = ((wide * self.a[None, :] + self.b[None, :]) % _MERSENNE) & _MAX32
            else:
                phv = _fmix32(hv)[:, None] * self.a[None, :] + self.b[None, :]
        return phv.min(axis=0).astype(np.uint32)


def lsh_params(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive/negative error, from datasketch."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, fp_weight, fn_weight)


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """One signed 64-bit key per band: the band's rows hashed together (BLAKE2b, 8 bytes)."""
    keys = []
    for band in range(bands):
        chunk = signature[band * rows : (band + 1) * rows].tobytes()
        keys.append(int.from_bytes(hashlib.blake2b(chunk, digest_size=8, person=bytes([band])).digest(), "little", signed=True))
    return keys


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The LSH S-curve: probability that two sets of this Jaccard similarity share a band."""
    return 1.0 - math.pow(1.0 - math.pow(similarity, rows), bands)
