"""Text documents (JSONL, gzipped JSONL, Parquet) to a Megatron ``.bin``/``.idx`` indexed dataset.

One entry is one document, followed by ``eos`` so that packed training sequences still see where a
document ends. Inputs are streamed (JSONL line by line, Parquet batch by batch) so corpora larger than
memory tokenize in constant memory; tokens are encoded in batches on all cores.

The readers here (:func:`iter_documents`) are shared with tokenizer training and its compression report,
so every tool accepts the same input formats and fails with the same one-line messages.
"""

from __future__ import annotations

import gzip
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from haina.core.errors import HainaError, InputFileError, one_line
from haina.core.files import read_jsonl_stream, replace_durable
from haina.core.tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
# A vocabulary this small fits uint16 with room to spare; Megatron reads the dtype back from the .idx.
UINT16_VOCAB_LIMIT = 65500
_BATCH_DOCS = 512
_PARQUET_BATCH_ROWS = 1024


def document_format(path: Path) -> str | None:
    """``"jsonl"``, ``"jsonl.gz"`` or ``"parquet"`` by file name; None for any other file."""
    name = Path(path).name.lower()
    if name.endswith(".gz") and name[:-3].endswith(JSONL_SUFFIXES):
        return "jsonl.gz"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def input_format(path: Path) -> str:
    """:func:`document_format`, or an :class:`InputFileError` in one line for an unsupported file."""
    fmt = document_format(path)
    if fmt is None:
        allowed = ", ".join([*JSONL_SUFFIXES, *(s + ".gz" for s in JSONL_SUFFIXES), *PARQUET_SUFFIXES])
        raise InputFileError(f"{path}: unsupported input extension (expected one of {allowed})")
    return fmt


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise InputFileError(f"{path}: input file not found")


def progress_total(path: Path) -> int:
    """Units :func:`iter_documents` reports through ``advance``: bytes on disk for JSONL, rows for Parquet."""
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return path.stat().st_size


def iter_documents(
    path: Path,
    text_key: str = "text",
    *,
    fields: Sequence[str] = (),
    advance: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``{text_key: str | None, field: value | None ...}`` per record, streaming the file.

    A record without ``text_key`` (or with a non-string value) raises InputFileError naming the file and the
    line/row, since silently dropping documents would bias the corpus. ``None`` text is passed through
    so the caller can count it as empty. ``advance(n)`` reports progress in :func:`progress_total` units.
    """
    path = Path(path)
    _check_exists(path)
    fmt = input_format(path)
    if fmt == "parquet":
        yield from _iter_parquet(path, text_key, fields, advance)
    else:
        yield from _iter_jsonl(path, text_key, fields, advance, gz=fmt == "jsonl.gz")


def _checked_text(record: dict[str, Any], text_key: str, where: str) -> str | None:
    if text_key not in record:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise InputFileError(f"{where}: record has no {text_key!r} field (fields: {keys})")
    text = record[text_key]
    if text is not None and not isinstance(text, str):
        raise InputFileError(f"{where}: field {text_key!r} is {type(text).__name__}, expected a string")
    return text


def _iter_jsonl(
    path: Path, text_key: str, fields: Sequence[str], advance: Callable[[int], None] | None, *, gz: bool
) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz else nullcontext(raw)) as stream:
        reported = 0
        for count, (where, record) in enumerate(read_jsonl_stream(stream, path), start=1):
            if advance is not None and count % 256 == 0:
                position = raw.tell()  # bytes on disk, compressed ones for gzip
                advance(position - reported)
                reported = position
            out = {text_key: _checked_text(record, text_key, where)}
            for field in fields:
                out[field] = record.get(field)
            yield out
        if advance is not None:
            advance(raw.tell() - reported)


def _iter_parquet(
    path: Path, text_key: str, fields: Sequence[str], advance: Callable[[int], None] | None
) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for non-Parquet bytes
        raise InputFileError(f"{path}: not a readable Parquet file ({one_line(exc)})") from None
    names = set(parquet.schema_arrow.names)
    if text_key not in names:
        shown = ", ".join(sorted(names)[:8]) or "none"
        raise InputFileError(f"{path}: no {text_key!r} column (columns: {shown})")
    wanted = [field for field in fields if field in names and field != text_key]
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_key, *wanted]):
        columns = {name: batch.column(name).to_pylist() for name in [text_key, *wanted]}
        for i in range(batch.num_rows):
            row += 1
            out = {text_key: _checked_text({text_key: columns[text_key][i]}, text_key, f"{path}:row {row}")}
            for field in fields:
                out[field] = columns[field][i] if field in columns else None
            yield out
        if advance is not None:
            advance(batch.num_rows)


def _builder_class() -> type:
    # megatron.core warns at import time about optional fused kernels and deprecations that
    # tokenization never touches; they would only bury the progress bar.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def _progress(enabled: bool) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[docs]:,} docs {task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def tokenize_to_indexed(
    inputs: list[Path],
    output_prefix: Path,
    tokenizer_model: Path,
    *,
    text_key: str = "text",
    append_eos: bool = True,
    progress: bool = True,
) -> dict:
    """Tokenize every document of ``inputs`` into ``output_prefix.bin``/``.idx``; returns counts.

    All inputs are checked (existence, extension) before any work so a typo fails in a second rather
    than after an hour. Files are written under temporary names and renamed at the end, so a failed run
    never leaves a truncated dataset that training would later read.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise HainaError("no input files given")
    for path in inputs:
        _check_exists(path)
        input_format(path)
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise InputFileError(f"{tokenizer_model}: tokenizer model not found")
    tokenizer = Tokenizer(tokenizer_model)
    dtype = np.uint16 if tokenizer.vocab_size < UINT16_VOCAB_LIMIT else np.int32
    eos = [tokenizer.eos_id] if append_eos else []

    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = Path(f"{output_prefix}.bin"), Path(f"{output_prefix}.idx")
    tmp_bin, tmp_idx = Path(f"{bin_path}.tmp{os.getpid()}"), Path(f"{idx_path}.tmp{os.getpid()}")
    builder = _builder_class()(str(tmp_bin), dtype=dtype)

    documents = tokens = skipped = 0
    started = time.perf_counter()

    def flush(batch: list[str]) -> None:
        nonlocal documents, tokens
        for ids in tokenizer.encode_batch(batch):
            ids.extend(eos)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            documents += 1
            tokens += len(ids)
        batch.clear()

    try:
        with _progress(progress) as bar:
            for path in inputs:
                task = None
                if bar is not None:
                    task = bar.add_task(path.name, total=progress_total(path), docs=0, tokens=0)

                def advance(n: int, task: Any = task) -> None:
                    if bar is not None:
                        bar.update(task, advance=n, docs=documents, tokens=tokens)

                batch: list[str] = []
                for record in iter_documents(path, text_key, advance=advance):
                    text = record[text_key]
                    if not text:
                        skipped += 1
                        continue
                    batch.append(text)
                    if len(batch) >= _BATCH_DOCS:
                        flush(batch)
                flush(batch)
                if bar is not None:
                    bar.update(task, docs=documents, tokens=tokens)
        builder.finalize(str(tmp_idx))
        replace_durable(tmp_bin, bin_path)
        replace_durable(tmp_idx, idx_path)
    except BaseException:
        builder.data_file.close()
        for leftover in (tmp_bin, tmp_idx):
            leftover.unlink(missing_ok=True)
        raise
    return {
        "documents": documents,
        "tokens": tokens,
        "skipped_empty": skipped,
        "files": len(inputs),
        "dtype": np.dtype(dtype).name,
        "bin": str(bin_path),
        "idx": str(idx_path),
        "seconds": round(time.perf_counter() - started, 2),
    }
