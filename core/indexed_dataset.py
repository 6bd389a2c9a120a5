"""The check of a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) before megatron-core reads it.

megatron-core trusts its files: a truncated ``.bin`` surfaces as a ``ValueError`` from ``numpy.frombuffer``
at the first sample that reaches past the end, and a garbage ``.idx`` as an ``AssertionError`` followed by
an ``AttributeError`` in its destructor - tracebacks a user cannot act on. :func:`check_indexed_dataset`
reads the index the way megatron-core writes it (``IndexedDatasetBuilder``, which ``haina data tokenize``
uses) and refuses a pair that disagrees, in one line naming the file and what is wrong.

The ``.idx`` layout (little-endian): the 9-byte magic, version ``1`` (u64), the token dtype code (u8),
the sequence count S and document count D (u64 each), then S sequence lengths (i32), S byte offsets of
the sequences in the ``.bin`` (i64), D document boundaries (i64; 0 first, S last), and for multimodal data
S mode bytes.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from haina.core.errors import InputFileError, one_line

MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's index magic (its own constant is private)
VERSION = 1
_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents: 34 bytes
_CHUNK = 1 << 22  # sequences per pass over the index arrays: bounded memory for any corpus size


def check_indexed_dataset(prefix: str | Path, field: str = "data.prefixes") -> None:
    """Refuse ``prefix.bin``/``prefix.idx`` unless both exist and the ``.bin`` holds exactly the tokens the
    ``.idx`` describes. ``field`` is the config field that named the prefix (for the message).

    Raises :class:`InputFileError` (exit status 2) with one line: the field, the file, what is wrong.
    """
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise InputFileError(f"{field}: {path} does not exist (make it with `haina data tokenize`)")
    try:
        _check_pair(bin_path, idx_path, field)
    except OSError as exc:  # unreadable (permissions, I/O error): still the user's file, still one line
        raise InputFileError(f"{field}: {prefix}: cannot read ({one_line(exc)})") from None


def _check_pair(bin_path: Path, idx_path: Path, field: str) -> None:
    def bad(path: Path, what: str) -> InputFileError:
        return InputFileError(f"{field}: {path}: {what} (re-make it with `haina data tokenize`)")

    idx_size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(_HEAD.size)
    if len(head) < _HEAD.size or not head.startswith(MAGIC):
        raise bad(idx_path, "not a Megatron index (no MMIDIDX header)")
    _, version, code, sequences, documents = _HEAD.unpack(head)
    if version != VERSION:
        raise bad(idx_path, f"index version {version}, expected {VERSION}")
    known = _dtype_codes()
    if code not in known:
        raise bad(idx_path, f"unknown token dtype code {code} (known: {', '.join(map(str, sorted(known)))})")
    dtype = known[code]
    itemsize = dtype.itemsize
    expected = _HEAD.size + sequences * (4 + 8) + documents * 8
    if idx_size not in (expected, expected + sequences):  # + S mode bytes: a multimodal index
        raise bad(
            idx_path,
            f"{idx_size} bytes, but its header's {sequences} sequences and {documents} document boundaries "
            f"need {expected} (truncated, or the counts are garbage)",
        )
    if documents < 1:
        raise bad(idx_path, "no document boundaries (an index always has at least the leading 0)")

    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, np.int32, sequences, _HEAD.size)
    pointers = np.frombuffer(index, np.int64, sequences, _HEAD.size + 4 * sequences)
    bounds = np.frombuffer(index, np.int64, documents, _HEAD.size + 12 * sequences)
    falls = any(bool((np.diff(bounds[start:start + _CHUNK + 1]) < 0).any()) for start in range(0, documents, _CHUNK))
    if bounds[0] != 0 or bounds[-1] != sequences or falls:
        raise bad(idx_path, f"document boundaries do not rise from 0 to the sequence count {sequences}")
    offset = 0  # bytes of the .bin before the current chunk of sequences
    for start in range(0, sequences, _CHUNK):
        chunk = lengths[start:start + _CHUNK].astype(np.int64)
        if bool((chunk < 0).any()):
            raise bad(idx_path, f"sequence {start + int(np.argmax(chunk < 0))} has a negative length")
        ends = offset + np.cumsum(chunk * itemsize)
        starts = np.concatenate(([offset], ends[:-1]))
        wrong = np.flatnonzero(pointers[start:start + _CHUNK] != starts)
        if wrong.size:
            raise bad(idx_path, f"sequence {start + int(wrong[0])} does not start where the one before it ends")
        offset = int(ends[-1])

    bin_size = bin_path.stat().st_size
    if bin_size != offset:
        raise bad(
            bin_path,
            f"{bin_size} bytes, but {idx_path.name} describes {offset // itemsize} {dtype.name} tokens "
            f"({offset} bytes): {'truncated' if bin_size < offset else 'longer than its index says'}",
        )


def _dtype_codes() -> dict[int, np.dtype]:
    """The token dtype codes of the format, from megatron-core's own table (imported when first needed:
    megatron-core warns at import that Transformer Engine and apex are absent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType

    return {member.value: np.dtype(member.name) for member in DType}
