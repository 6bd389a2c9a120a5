"""Lines of a gzip file, read in Python so that a damaged file ends that file, not the job.

Hadoop's gzip codec throws at the first bad byte and takes the Spark task (and with it the job) down with
a Java stack. Here the stream is inflated with :mod:`zlib` piece by piece: every complete line before the
damage is returned, and the damage itself becomes one last row that says what went wrong and where, at
exact byte offsets of both the compressed file and the decompressed stream. Lines are split on ``\\n``
only (never on ``\\r`` or Unicode line separators), the way JSON Lines defines them.

gzip checks a member's CRC-32 only at its end, so bytes flipped in the middle may inflate to garbage first:
those lines are parsed like any other (and usually quarantined as malformed) before the damage is named.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import BinaryIO

GZIP_WBITS = 31  # zlib: expect a gzip header and trailer (CRC-32 and length are checked)
_CHUNK = 1 << 16


@dataclass
class Damage:
    """Where a compressed file stopped being readable."""

    error: str
    compressed_offset: int  # byte of the .gz file at which the damage was found
    decompressed_offset: int  # bytes of decompressed data read before it
    lines_read: int = 0  # complete lines before the damage (blank ones included)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class DamagedStream(Exception):
    """Raised by :func:`inflate` after it has yielded everything before the damage."""

    def __init__(self, damage: Damage) -> None:
        super().__init__(damage.error)
        self.damage = damage


def _locate(inflater: zlib._Decompress, data: bytes) -> tuple[bytes, int]:
    """Feed ``data`` one byte at a time to a copy of the inflater from before the failing call: the output
    up to the bad byte, and its index (run once per damaged file, so the slowness does not matter)."""
    out = []
    for index in range(len(data)):
        try:
            out.append(inflater.decompress(data[index : index + 1]))
        except zlib.error:
            return b"".join(out), index
    return b"".join(out), len(data)


def inflate(handle: BinaryIO, chunk: int = _CHUNK) -> Iterator[bytes]:
    """Decompressed pieces of a gzip stream (concatenated members, zero padding after a member, as gzip(1)
    accepts); at damage, the output before it, then :class:`DamagedStream`."""
    inflater: zlib._Decompress | None = None  # None between members
    members = 0
    consumed = produced = 0
    while True:
        try:
            data = handle.read(chunk)
        except OSError as exc:  # a read error of the disk or the network file system
            raise DamagedStream(Damage(f"unreadable ({exc.strerror or exc})", consumed, produced)) from None
        if not data:
            break
        while data:
            if inflater is None:
                if members:
                    rest = data.lstrip(b"\0")
                    consumed += len(data) - len(rest)
                    data = rest
                    if not data:
                        break
                inflater = zlib.decompressobj(GZIP_WBITS)
            before = inflater.copy()
            try:
                out = inflater.decompress(data)
            except zlib.error as exc:
                out, index = _locate(before, data)
                if out:
                    yield out
                reason = f"corrupt data: {str(exc).rpartition(': ')[2]}"  # zlib's own words, e.g. "incorrect data check"
                raise DamagedStream(Damage(reason, consumed + index, produced + len(out))) from None
            consumed += len(data) - len(inflater.unused_data)
            produced += len(out)
            if out:
                yield out
            if inflater.eof:
                data, inflater = inflater.unused_data, None
                members += 1
            else:
                data = b""
    if inflater is not None:  # a member started and never reached its end
        raise DamagedStream(Damage("truncated (the file ends inside a compressed block)", consumed, produced))


def gzip_lines(path: str) -> Iterator[tuple[bytes, Damage | None]]:
    """``(line, None)`` for each non-blank line of a gzip file, split on ``\\n`` only; after damage a last
    ``(partial line, Damage)`` row, the partial line possibly empty."""
    pending: list[bytes] = []  # pieces of a line not yet ended
    lines = 0
    try:
        with open(path, "rb") as handle:
            for piece in inflate(handle):
                parts = piece.split(b"\n")
                if len(parts) == 1:
                    pending.append(piece)
                    continue
                parts[0] = b"".join([*pending, parts[0]])
                tail = parts.pop()
                pending = [tail] if tail else []
                for line in parts:
                    lines += 1
                    if line.strip():
                        yield line, None
    except DamagedStream as exc:
        exc.damage.lines_read = lines
        yield b"".join(pending), exc.damage
        return
    except OSError as exc:  # cannot even be opened (permissions, a vanished file)
        yield b"", Damage(f"unreadable ({exc.strerror or exc})", 0, 0, 0)
        return
    last = b"".join(pending)
    if last.strip():
        yield last, None
