"""Checkpoint integrity and safe reading: a manifest of sizes and checksums, durable writes, no pickled code.

Why: a checkpoint is trusted input to a long job. A truncated or altered file must fail loudly with the
file's name, never load as wrong weights; and loading must not run code, while DCP's own reader
unpickles ``.metadata`` with plain ``pickle`` and byte items with ``torch.load(weights_only=False)``.
:class:`SafeReader` unpickles the metadata through an allowlist of DCP's metadata types, and
:class:`SafeLoadPlanner` reads byte items with ``weights_only=True``; the manifest is checked first.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, truncated or altered (one line, names the file)."""


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


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(step_dir: Path) -> dict[str, Any]:
    """Record every file of a fully written checkpoint folder (size and crc32), durably."""
    files = {}
    for path in sorted(p for p in step_dir.iterdir() if p.is_file() and p.name != MANIFEST):
        fsync_file(path)
        files[path.name] = {"size": path.stat().st_size, "crc32": _crc32(path)}
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


def verify_checkpoint(step_dir: Path, shard: tuple[int, int] = (0, 1)) -> None:
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


# --- reading without executing pickled code -------------------------------------------------------------

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses and enums, torch dtypes/sizes/layouts and paths: no callables."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with an allowlisting unpickler for ``.metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            data = stream.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({exc})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Byte items (optimizer hyper-parameters) through ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element as set_nested

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_nested(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
