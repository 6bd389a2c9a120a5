"""What the dedup stages decide on, taken once from each document as it came in.

Exact dedup and near-dedup judge the documents as they entered the job, not as the edit stages left
them: the C4 line rules, the sentence-quality classifier and line/paragraph dedup can trim two copies of
one text very differently (one loses half its sentences, the other none; a later copy loses every line
an earlier one already has), and copies that have drifted apart by the time near-dedup runs are still
copies. So ingest takes the exact-dedup normalisation of each document (:func:`normalize`: NFKC, lower
case, punctuation dropped, whitespace collapsed) once and adds:

* ``_key``: the exact-dedup key, 16 bytes of BLAKE2b of the normalised text (when exact dedup runs),
  carried as a column: every stage passes on the columns it does not write (``map_columns`` and the joins
  keep them), so exact dedup finds it wherever the configured stage order puts it;
* ``_bands``: the LSH band keys of the MinHash signature of its word shingles, and, for verification and
  the report's similarity, either ``_hv``, the distinct shingle hashes (``near_dedup.verify: exact``, one
  uint32 per distinct shingle, sorted), or ``_sig``, the signature itself (``signature`` or ``none``,
  ``num_perm`` uint32) (when near-dedup runs). Both are packed as bytes (``arrow_batches.packed``, a row
  read back with :func:`unpacked`): only the few thousand candidate pairs ever look inside them, and Spark
  writes, caches and joins a blob per document several times faster than an array of ints (writing ``_hv``
  as an array took two thirds of ingest's Parquet write at 50,000 documents).

The near-dedup columns are as large as the text itself (four bytes per word), so they are not carried
through the stages in between: they stay in ingest's stage folder, whose documents the stages read
without them (Parquet reads only the columns asked for), and near-dedup joins them onto the row ids
that reach it. Carrying them cost each stage before near-dedup about a second at 50,000 documents (read,
sent through Python and back, written).

Shingles of the normalised text are those of the raw text (shingle tokens ignore case, punctuation and
spacing anyway) up to NFKC folding. The stage that needs a column drops it, and the job drops every
column whose name starts with ``_`` before writing ``kept/`` (``removed/`` has a fixed projection), so
none of them reaches the training output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from haina.data_spark.arrow_batches import packed
from haina.data_spark.config import NearDedupConfig, PrepareConfig
from haina.data_spark.minhash import (
    MinHasher,
    band_key_matrix,
    batch_signatures,
    fast_shingle_hashes,
    lsh_params,
    sha1_shingle_hashes,
)
from haina.data_spark.text import normalize_many

KEY_FIELD = T.StructField("_key", T.BinaryType())
SIG_FIELD = T.StructField("_sig", T.BinaryType())
BANDS_FIELD = T.StructField("_bands", T.ArrayType(T.LongType()))
HV_FIELD = T.StructField("_hv", T.BinaryType())
NEAR_COLUMNS = ("_sig", "_bands", "_hv")


def unpacked(blob: bytes) -> np.ndarray:
    """The uint32 values of one packed row of ``_hv`` or ``_sig``."""
    return np.frombuffer(blob, dtype="<u4")


def exact_key(normalized: str) -> bytes:
    """The exact-dedup key of a document's normalised text."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


@dataclass(frozen=True)
class Signer:
    """MinHash signatures, band keys and shingle hashes of a batch of texts, for one near-dedup config;
    picklable, so it ships to executors as is."""

    hasher: MinHasher
    bands: int
    rows: int
    shingle_size: int
    shingle_hash: str = "fast"

    @classmethod
    def create(cls, cfg: NearDedupConfig) -> Signer:
        bands, rows = lsh_params(cfg.lsh_threshold, cfg.num_perm, cfg.false_positive_weight, cfg.false_negative_weight)
        return cls(MinHasher.create(cfg.num_perm, cfg.seed, cfg.scheme), bands, rows, cfg.shingle_size, cfg.shingle_hash)

    def sign_batch(self, texts: list[str | None]) -> tuple[pa.Array, pa.Array, pa.Array]:
        """(signatures, band keys, sorted distinct shingle hashes), one per text, the first and last packed
        (uint32); all null for a text without tokens. Built from numpy buffers: no Python object per
        value."""
        if self.shingle_hash == "sha1":
            hv, offsets = sha1_shingle_hashes(texts, self.shingle_size, self.hasher)
        else:
            hv, offsets = fast_shingle_hashes(texts, self.shingle_size)
        sig = batch_signatures(self.hasher, hv, offsets)
        present = np.diff(offsets) > 0
        mask = pa.array(~present)
        width = self.hasher.num_perm
        keys = band_key_matrix(sig, self.bands, self.rows)
        keys[~present] = 0  # (null rows: the mask hides them)
        keys = keys.reshape(-1)

        n = len(texts)
        bands = pa.ListArray.from_arrays(pa.array((np.arange(n + 1) * self.bands).astype(np.int32)), pa.array(keys),
                                         mask=mask)
        return (packed(sig.reshape(-1), np.full(n, width), present), bands,
                packed(hv.astype(np.uint32), np.diff(offsets), present))


def near_fields(cfg: NearDedupConfig) -> list[T.StructField]:
    """The near-dedup columns ingest carries: band keys, and what verification and the report compare."""
    return [BANDS_FIELD, HV_FIELD if cfg.verify == "exact" else SIG_FIELD]


def carried(df: DataFrame | None, cfg: NearDedupConfig) -> bool:
    """Whether ``df`` (ingest's near-dedup table, None for a stage run on its own) has the near-dedup
    columns that ``cfg`` needs."""
    return df is not None and {f.name for f in near_fields(cfg)} <= set(df.columns)


def key_fields(cfg: PrepareConfig) -> list[T.StructField]:
    """The columns ingest adds: ``_key`` (exact dedup enabled) and the near-dedup ones (near-dedup enabled)."""
    return ([KEY_FIELD] if cfg.exact_dedup.enabled else []) + (near_fields(cfg.near_dedup) if cfg.near_dedup.enabled else [])


def key_maker(cfg: PrepareConfig) -> Callable[[list[str | None]], dict[str, list | pa.Array]]:
    """``fn(texts) -> {column: values}`` of :func:`key_fields`, from one normalisation of each text; a
    missing text (a quarantined record) gets nulls."""
    names = [f.name for f in key_fields(cfg)]
    signer = Signer.create(cfg.near_dedup) if cfg.near_dedup.enabled else None

    def keys(batch_texts: list[str | None]) -> dict[str, list | pa.Array]:
        normalized = normalize_many(batch_texts)
        out: dict[str, list | pa.Array] = {}
        if cfg.exact_dedup.enabled:
            out["_key"] = [None if text is None else exact_key(text) for text in normalized]
        if signer is not None:
            sig, bands, hv = signer.sign_batch(normalized)
            out["_bands"] = bands
            out["_hv" if "_hv" in names else "_sig"] = hv if "_hv" in names else sig
        return out

    return keys
