"""Reading and publishing files, one way each: YAML, JSON Lines, and the atomic publish of a folder.

Every reader fails on bad input with a :class:`~haina.core.errors.InputFileError` whose one-line message
names the file (and line); every writer that others may read while it runs publishes atomically: write
into a temporary sibling, fsync, record a manifest of sizes and CRC-32s, rename into place, fsync the
parent. A reader then sees the folder whole or not at all, and :func:`verify_manifest` catches a file that
was truncated or altered afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from haina.core.errors import HainaError, InputFileError, one_line

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------- reading

def read_yaml(
    path: str | Path, *, what: str = "YAML file", text: str | None = None,
    error: type[HainaError] = InputFileError,
) -> dict[str, Any]:
    """A YAML mapping from ``path`` (or from ``text``, named ``path`` in errors); an empty file is {}.
    Failures raise ``error`` (a :class:`HainaError`) with one line naming the file."""
    if text is None:
        if not Path(path).is_file():
            raise error(f"{path}: no such {what}")
        text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return data


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) for each non-blank line; a bad line fails naming it."""
    if not Path(path).is_file():
        raise InputFileError(f"{path}: no such file")
    with open(path, "rb") as handle:
        yield from read_jsonl_stream(handle, path)


def read_jsonl_stream(stream: BinaryIO, name: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The one JSONL parser: (``name:line``, object) per non-blank line of an open binary stream (a plain
    or gzip file) called ``name`` in errors; a bad line fails naming it. The caller may ask the underlying file for its position between items (progress). Bytes that are not
    UTF-8, and a stream that cannot be read (a corrupt gzip), fail in one line too."""
    try:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            where = f"{name}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputFileError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{where}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise InputFileError(f"{where}: not valid JSON (nested too deep)") from None
            except ValueError as exc:  # an integer past Python's digit limit
                raise InputFileError(f"{where}: not valid JSON ({one_line(exc)})") from None
            if not isinstance(item, dict):
                raise InputFileError(f"{where}: each line must be a JSON object")
            if b"\\u" in raw and _lone_surrogate(item):  # only escapes can make one
                raise InputFileError(f"{where}: a string holds an unpaired surrogate escape such as \\ud800 (not text)")
            yield where, item
    except (OSError, EOFError, zlib.error) as exc:
        raise InputFileError(f"{name}: cannot read ({one_line(exc)})") from None


def _lone_surrogate(item: Any) -> bool:
    """Whether a parsed line holds a string that is not text (a \\ud800 escape without its pair): it
    would fail later, in a tokenizer or a writer, far from the line that caused it."""
    try:
        json.dumps(item, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ------------------------------------------------------------------------------------------ durability

class CheckpointError(InputFileError):
    """A published folder (checkpoint, data stage) that is missing, incomplete, truncated or altered."""


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the directory's own metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_durable(tmp: Path, final: Path) -> None:
    """Move the fully written file ``tmp`` to ``final`` atomically: fsync, rename (replacing), fsync of
    the folder. For files too large to pass through :func:`write_durable` (a tokenized ``.bin``)."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root`` (and ``root``): a folder of nested files written by
    others (Spark's Parquet parts) made durable before :func:`publish_dir` renames it."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def manifest_entries(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """fsync, size and crc32 of the named files of ``folder``: the expensive part of a manifest, which
    ranks split between them (each reads its share) instead of rank 0 reading every rank's files."""
    entries = {}
    for name in names:
        path = folder / name
        fsync_file(path)
        entries[name] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    return entries


def write_manifest(step_dir: Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Record every file of a fully written checkpoint folder (size and crc32), durably; ``known`` holds
    entries already computed (by other ranks), the rest are read here."""
    known = dict(known or {})
    rest = sorted(p.name for p in step_dir.iterdir() if p.is_file() and p.name != MANIFEST and p.name not in known)
    files = dict(sorted({**known, **manifest_entries(step_dir, rest)}.items()))
    manifest = {"format": 1, "files": files}
    write_durable(step_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(step_dir: Path) -> dict[str, Any]:
    path = step_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{step_dir}: no {MANIFEST} (an incomplete checkpoint, or not written by haina)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, AssertionError):
        raise CheckpointError(f"{path}: unreadable manifest") from None
    return manifest


def verify_manifest(step_dir: Path, shard: tuple[int, int] = (0, 1)) -> None:
    """Check the files of ``step_dir`` against its manifest; ``shard=(rank, world)`` checks every
    world-th file only, so ranks share the reading. Raises :class:`CheckpointError` naming the file."""
    files = sorted(read_manifest(step_dir)["files"].items())
    rank, world = shard
    for name, expected in files[rank::world]:
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: truncated or extended ({size} bytes, manifest says {expected['size']})")
        if _crc32(path) != expected["crc32"]:
            raise CheckpointError(f"{path}: contents altered (crc32 differs from {MANIFEST})")


def publish_dir(
    tmp: Path, final: Path, *, manifest: bool = True, before_rename: Callable[[], None] | None = None,
    known: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Make the fully written folder ``tmp`` appear as ``final`` in one step: manifest (which fsyncs every
    file), fsync, rename (an existing ``final`` is replaced), fsync of the parent. ``before_rename`` runs
    when everything is durable but not yet visible (fault-injection tests stop there); ``known`` are
    manifest entries computed elsewhere (:func:`write_manifest`)."""
    if manifest:
        write_manifest(tmp, known)
    fsync_dir(tmp)
    if before_rename is not None:
        before_rename()
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
    tmp.rename(final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
