"""Per-Arrow-batch Python work on a DataFrame: the only place the job runs Python over rows.

Every stage that needs Python (parsing, rules, signatures, classifiers) goes through
:func:`map_columns`, which runs inside ``mapInArrow`` on each executor, or, for a summary of each batch
(a histogram, a batch's lowest scores) that Spark then combines, :func:`summarize_batches`; grouping, joins
and connected components stay on native Spark columns, so no Python runs in a shuffle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql.types import StructField, StructType

BatchFn = Callable[[pa.RecordBatch], dict[str, pa.Array | list]]


def _arrow_type(field: StructField) -> pa.DataType:
    from pyspark.sql.pandas.types import to_arrow_type

    return to_arrow_type(field.dataType)


def map_columns(df: DataFrame, fn: BatchFn, fields: list[StructField], drop: tuple[str, ...] = ()) -> DataFrame:
    """Apply ``fn(batch) -> {column: values}`` per Arrow batch; new columns are appended, same names replaced."""
    new_names = {f.name for f in fields}
    kept = [f for f in df.schema.fields if f.name not in new_names and f.name not in drop]
    schema = StructType([*kept, *fields])
    types = {f.name: _arrow_type(f) for f in fields}
    names = schema.fieldNames()

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            new = fn(batch)
            columns = []
            for name in names:
                if name in new:
                    values = new[name]
                    array = values if isinstance(values, pa.Array) else pa.array(values, type=types[name])
                    columns.append(array.cast(types[name]) if array.type != types[name] else array)
                else:
                    columns.append(batch.column(name))
            yield pa.RecordBatch.from_arrays(columns, names=names)

    return df.mapInArrow(run, schema)


def summarize_batches(df: DataFrame, fn: BatchFn, fields: list[StructField]) -> DataFrame:
    """Rows ``fn(batch) -> {column: values}`` (any number per batch, ``fields`` their schema) for every Arrow
    batch of ``df``: a few rows of summary per batch instead of a row per item."""
    schema = StructType(fields)
    types = [_arrow_type(f) for f in fields]
    names = schema.fieldNames()

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out = fn(batch)
            yield pa.RecordBatch.from_arrays([pa.array(out[n], type=t) for n, t in zip(names, types, strict=True)],
                                             names=names)

    return df.mapInArrow(run, schema)


def texts(batch: pa.RecordBatch, name: str = "text") -> list[str]:
    return batch.column(name).to_pylist()


def packed(values: np.ndarray, counts: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    """A binary column holding each row's ``counts[i]`` consecutive ``values`` as little-endian bytes (null
    where not ``present``). The stages' numbers per document (shingle hashes, sentence scores, embeddings) travel so:
    Spark converts, caches, writes and reads a blob per row several times faster than an array column
    (a value at a time), and the Python that reads them takes the whole batch's values at once
    (:func:`unpacked_column`)."""
    data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(np.asarray(counts, dtype=np.int64) * data.itemsize, out=offsets[1:])
    array = pa.Array.from_buffers(pa.binary(), len(counts), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    if present is None or present.all():
        return array
    return pc.if_else(pa.array(present), array, pa.scalar(None, pa.binary()))


def unpacked_column(column: pa.Array, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(every value of a :func:`packed` column, each row's count; a null row has none)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if column.null_count:
        column = column.fill_null(b"")
    wide = pa.types.is_large_binary(column.type)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64 if wide else np.int32, count=len(column) + 1,
                            offset=column.offset * (8 if wide else 4))
    data = column.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    return raw.view(dtype), np.diff(offsets).astype(np.int64) // dtype.itemsize
