"""Tables read in bounded batches, with the derived columns that carry cross-row checks.

GX evaluates expectations on one pandas DataFrame at a time, so a table is validated batch by batch
(at most `chunk_rows` rows in memory) and the results are summed (validation/runner.py). Checks that
span rows are turned into per-row derived columns first, so that they stay exact across batches:

- references: `<col>_not_in_<parent>` holds the id where it is missing from the parent table (the
  parent's ids are held in memory: the size of the catalog, not of the event table);
- unique keys: `<col>_duplicate` holds the key where it occurs more than once. A first pass hashes
  the key columns (8 bytes a row) and keeps the hashes seen twice; a 64-bit collision could flag a
  false duplicate (about n^2 / 2^65: 3e-6 for 10M rows).

Means run on a uniform sample of at most `sample_rows` rows (an unbiased estimate); distinct-value
counts (cardinality) are exact: a streaming pass collects each column's distinct values (a sample
would undercount them and fail a lower bound), stopping at one more than the allowed maximum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from models.parquet_stream import open_stream

_INTS = {t: pd.Int64Dtype() for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64())}
# The row checks' frames: strings as a string dtype, not object (GX then checks a type list once per
# column, where an object column is type-checked value by value: 19 s of 120 on a 14M-row log), and
# one kept in arrow, not in Python objects: GX copies the whole frame for most column metrics (its
# null filter), which for Python strings means a reference count per value; the arrow conversion to
# Python strings and their null checks went too. GX's type list "StringDtype" names the default
# storage, so the checks run under ROW_STRING_STORAGE as that default (validation/runner.py).
ROW_STRING_STORAGE = "pyarrow"
_ROW_TYPES = {**_INTS, pa.string(): pd.StringDtype(ROW_STRING_STORAGE),
              pa.large_string(): pd.StringDtype(ROW_STRING_STORAGE)}


def to_pandas(table: pa.Table | pa.RecordBatch) -> pd.DataFrame:
    """Integer columns stay integer when they hold nulls.

    pyarrow's default turns int64-with-nulls into float64 (e.g. ranking_logs.position, which is null
    on non-shown rows); the nullable Int64 keeps the values and dtype GX should see.
    """
    return table.to_pandas(types_mapper=_INTS.get)


def row_frame(table: pa.Table) -> pd.DataFrame:
    """`to_pandas` for the row checks, with every list column as its lists' lengths (null stays null).

    The row suites only ask of a multi-valued column that it exists and how often it is null, which
    lengths answer exactly. Python lists in a DataFrame cost twice: the conversion builds a list object
    per row, and GX fingerprints each batch it is given (`hash_pandas_dataframe`), which falls back to
    pickling the whole frame when a column holds unhashable lists: 20.6 s per 1M training examples
    with 20-item histories, hours of a 10M materialize."""
    lists = [i for i, f in enumerate(table.schema)
             if pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type)]
    for i in lists:
        table = table.set_column(i, table.schema.field(i).name, pc.list_value_length(table.column(i)))
    return table.to_pandas(types_mapper=_ROW_TYPES.get)


@dataclass(frozen=True)
class Source:
    """A table to validate: a parquet file (streamed) or an arrow table already in memory."""

    name: str
    path: Path | None = None
    table: pa.Table | None = None

    @property
    def rows(self) -> int:
        return self.table.num_rows if self.table is not None else pq.ParquetFile(self.path).metadata.num_rows

    @property
    def columns(self) -> list[str]:
        return self.table.column_names if self.table is not None else pq.read_schema(self.path).names

    def batches(self, size: int, columns: list[str] | None = None, start: int = 0,
                stop: int | None = None) -> Iterator[pa.Table]:
        """Rows [start, stop) (default: all) in tables of `size` rows, the last one shorter; always at
        least one (empty) so that column checks run. A file is read from the row group holding `start`
        to the one holding `stop - 1`: a worker checking one part of a file decodes that part."""
        cols = None if columns is None else [c for c in columns if c in self.columns]
        stop = self.rows if stop is None else stop
        if self.table is not None:
            table = self.table if cols is None else self.table.select(cols)
            for at in range(start, max(stop, start + 1), size):
                yield table.slice(at, min(size, stop - at))
            return
        f = open_stream(self.path)
        if stop <= start:
            empty = f.schema_arrow.empty_table()
            yield empty if cols is None else empty.select(cols)
            return
        ends = np.cumsum([f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)])
        first = int(np.searchsorted(ends, start, side="right"))      # the group holding row `start`
        last = int(np.searchsorted(ends, stop - 1, side="right"))    # ... and row `stop - 1`
        at = int(ends[first - 1]) if first else 0                  # the file's row read next
        pending: list[pa.RecordBatch] = []
        held = 0
        for batch in f.iter_batches(batch_size=size, row_groups=range(first, last + 1), columns=cols):
            # cut at multiples of `size` from `start`, whatever the row groups' lengths
            lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
            at += batch.num_rows
            piece = batch.slice(lo, max(hi - lo, 0))
            while piece.num_rows:
                take = min(size - held, piece.num_rows)
                pending.append(piece.slice(0, take))
                held, piece = held + take, piece.slice(take)
                if held == size:
                    yield pa.Table.from_batches(pending)
                    pending, held = [], 0
            if at >= stop:
                break
        if pending:
            yield pa.Table.from_batches(pending)


@dataclass(frozen=True)
class UniqueKey:
    """Key columns that must be unique (among rows where `where_column == where_value`, if set)."""

    columns: tuple[str, ...]
    derived: str
    where_column: str | None = None
    where_value: str | None = None


@dataclass
class Derived:
    """The derived columns of one table: references to parent ids and duplicate keys."""

    references: dict[str, tuple[str, pd.Index]] = field(default_factory=dict)  # derived -> (column, parent ids)
    unique: list[tuple[UniqueKey, np.ndarray]] = field(default_factory=list)   # key, sorted duplicate hashes

    def apply(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The frame with the derived columns added (skipped where the source column is missing)."""
        extra: dict[str, pd.Series] = {}
        for derived, (col, parent) in self.references.items():
            if col in frame.columns:
                # Null ids stay null here (the not-null expectation reports them), so the derived
                # column is null exactly for the rows that pass.
                extra[derived] = frame[col].where(~frame[col].isin(parent) | frame[col].isna())
        for key, dups in self.unique:
            if all(c in frame.columns for c in key.columns):
                hashes, valid = _key_hashes(frame, key)
                hit = pd.Series(valid & np.isin(hashes, dups), index=frame.index)
                # only the repeated rows get their key spelled out (a string per row of every batch
                # would cost seconds per million rows for a compound key)
                values = pd.Series(None, index=frame.index, dtype=object)
                if hit.any():
                    values[hit] = _key_values(frame[hit], key)
                extra[key.derived] = values
        return frame.assign(**extra) if extra else frame


@dataclass(frozen=True)
class RowBatches:
    """A table's row-check frames (its batches with the derived columns), made as they are read: all
    of them, or one process's share (the k-th of n runs of consecutive batches) when several processes
    check a large table at once (validation/runner.py)."""

    source: Source
    chunk_rows: int
    derived: Derived = field(default_factory=Derived)

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.source.rows / self.chunk_rows))

    def indexes(self, share: tuple[int, int] = (0, 1)) -> range:
        """The batches of the k-th of n shares: consecutive ones, so that a share reads only its own
        part of the file (with every n-th batch each share decoded the whole file)."""
        k, n = share
        return range(k * self.count // n, (k + 1) * self.count // n)

    def __call__(self, share: tuple[int, int] = (0, 1)) -> Iterator[pd.DataFrame]:
        mine = self.indexes(share)
        stop = min(mine.stop * self.chunk_rows, self.source.rows)
        for batch in self.source.batches(self.chunk_rows, start=mine.start * self.chunk_rows, stop=stop):
            yield self.derived.apply(row_frame(batch))


def _key_values(frame: pd.DataFrame, key: UniqueKey) -> pd.Series:
    if len(key.columns) == 1:
        return frame[key.columns[0]].astype(object)
    # Compound keys read back as "(r17, 3)" in failure examples.
    return pd.Series(["(" + ", ".join(map(str, t)) + ")" for t in
                      zip(*(frame[c] for c in key.columns))], index=frame.index, dtype=object)


def _key_hashes(frame: pd.DataFrame, key: UniqueKey) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the key columns and which rows take part (no null key, condition met)."""
    cols = frame[list(key.columns)]
    valid = cols.notna().all(axis=1).to_numpy()
    if key.where_column is not None:
        valid &= (frame[key.where_column] == key.where_value).fillna(False).to_numpy(dtype=bool)
    hashes = np.zeros(len(frame), dtype=np.uint64)
    for c in key.columns:
        # combined in column order (x 1000003, xor), as pandas combines columns, without its cost
        hashes = (hashes * np.uint64(1_000_003)) ^ _column_hashes(cols[c], valid)
    return hashes, valid


def _column_hashes(col: pd.Series, valid: np.ndarray) -> np.ndarray:
    """64-bit hashes of one key column, alike for equal values whatever the batch's dtype (int64,
    Int64). Times and integers hash as int64 (hashing them as Python objects turns each into a
    string: 78 s per million (user, item, time) keys on 2 loaded cores, against 1.8 s)."""
    dtype = col.dtype
    if isinstance(dtype, pd.DatetimeTZDtype):
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
        dtype = col.dtype
    if pd.api.types.is_datetime64_dtype(dtype):
        return pd.util.hash_array(col.to_numpy(dtype="datetime64[ns]").view("int64"))
    if pd.api.types.is_integer_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
        return pd.util.hash_array(col.fillna(0).to_numpy(dtype="int64"))      # nulls: not valid rows
    if pd.api.types.is_float_dtype(dtype):
        values = col.to_numpy(dtype="float64", na_value=0.0)
        if np.array_equal(values[valid], np.trunc(values[valid])):          # integers that came as floats
            return pd.util.hash_array(values.astype("int64"))
        return pd.util.hash_array(values)
    if isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow":     # the row frames' strings
        return _string_hashes(pa.array(col.array))
    return pd.util.hash_array(col.astype(object).to_numpy())


def _string_hashes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """pandas' hashes of arrow strings (the same values as of the Python strings), each distinct
    string made a Python object once: arrow finds the distinct ones (dictionary_encode), not a
    Python string per row (a 1M-row id column: 2.2 -> 0.16 s). Nulls hash as 0 (not valid rows)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = values.dictionary_encode()
    distinct = pd.util.hash_array(encoded.dictionary.to_numpy(zero_copy_only=False), categorize=False)
    index = encoded.indices.fill_null(0).to_numpy()
    return distinct[index] if len(distinct) else np.zeros(len(index), dtype=np.uint64)


def duplicate_hashes(source: Source, key: UniqueKey, chunk_rows: int) -> np.ndarray:
    """Sorted hashes of the keys that occur more than once; reads only the key columns."""
    if not all(c in source.columns for c in key.columns):
        return np.empty(0, dtype=np.uint64)
    cols = [*key.columns, *([key.where_column] if key.where_column else [])]
    parts = []
    for batch in source.batches(chunk_rows, cols):
        hashes, valid = _key_hashes(row_frame(batch), key)
        parts.append(hashes[valid])
    if not parts:
        return np.empty(0, dtype=np.uint64)
    all_hashes = np.sort(np.concatenate(parts))
    return np.unique(all_hashes[1:][all_hashes[1:] == all_hashes[:-1]])


def sample(source: Source, columns: list[str], max_rows: int, chunk_rows: int, seed: int = 0) -> pd.DataFrame:
    """The given columns of the whole table, or a uniform row sample of about max_rows rows."""
    rows = source.rows
    rng = np.random.default_rng(seed)
    keep = 1.0 if rows <= max_rows else max_rows / rows
    parts = []
    for batch in source.batches(chunk_rows, columns):
        if keep < 1.0:
            batch = batch.filter(pa.array(rng.random(batch.num_rows) < keep))
        parts.append(to_pandas(batch))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def distinct_values(source: Source, columns: list[str], chunk_rows: int, cap: int) -> pd.DataFrame:
    """Each column's distinct non-null values (at most cap of them), one column each, null-padded.

    The frame GX counts unique values on: its counts are the table's exact distinct counts up to cap.
    """
    seen: dict[str, set] = {c: set() for c in columns}
    for batch in source.batches(chunk_rows, columns):
        for c in columns:
            if c not in batch.column_names or len(seen[c]) >= cap:
                continue
            new = [v for v in batch.column(c).unique().drop_null().to_pylist() if v not in seen[c]]
            seen[c].update(new[: cap - len(seen[c])])
    longest = max((len(v) for v in seen.values()), default=0)
    return pd.DataFrame({c: pd.Series(sorted(v, key=str) + [None] * (longest - len(v)), dtype=object)
                         for c, v in seen.items() if c in source.columns})
