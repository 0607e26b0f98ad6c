"""Vocabularies: feature values and ids <-> indices 1..n (0 is out of vocabulary).

The keys follow one rule whatever the input's dtype (integral floats print as ints, so an int column
that met a null keeps its vocabulary); a few values (one serving request) are keyed in Python by the
same rules, many by pandas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

OOV = 0


def _category_keys(values: pd.Series) -> pd.Series:
    """Feature values as strings; integral floats (an int column that met a null) print as ints."""
    s = pd.Series(values).reset_index(drop=True)
    if pd.api.types.is_float_dtype(s):
        finite = s.dropna()
        if (finite % 1 == 0).all():
            s = s.astype("Int64")
    keys = s.astype(object).where(s.notna(), None)
    return keys.map(lambda v: None if v is None else str(v))


SMALL_LOOKUP = 64   # up to this many values, Vocab.lookup keys them in Python (same rules, see _small_keys)


def _arrow_values(values: pd.Series | np.ndarray | list) -> pa.Array | None:
    """The values as one arrow array when they convert as they are (an arrow-backed column as is;
    strings, integers, nullable integers), else None (mixed Python objects, ints beyond int64)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.ArrowDtype):
        return pa.chunked_array(values.array.__arrow_array__()).combine_chunks()
    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


def _small_keys(values: pd.Series | np.ndarray | list, kind: str) -> list | None:
    """Vocab._keys for a few values, element by element: int64 kind → int (non-integral → None);
    string kind → str, where a float column whose values are all integral prints them as ints (as
    _category_keys does). None when the dtype is one these rules do not cover."""
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    dtype = s.dtype
    items = s.tolist()
    if kind == "int64":
        if pd.api.types.is_integer_dtype(dtype):
            return [None if v is None or v is pd.NA else int(v) for v in items]
        return None
    if pd.api.types.is_bool_dtype(dtype) or isinstance(dtype, (pd.CategoricalDtype, pd.ArrowDtype)):
        return None
    if pd.api.types.is_float_dtype(dtype):
        present = [v for v in items if v is not None and v is not pd.NA and v == v]
        integral = all(v % 1 == 0 for v in present)
        return [None if v is None or v is pd.NA or v != v else (str(int(v)) if integral else str(v))
                for v in items]
    if pd.api.types.is_integer_dtype(dtype):
        return [None if v is None or v is pd.NA else str(int(v)) for v in items]
    if dtype == object and all(isinstance(v, str) or v is None or (isinstance(v, float) and v != v)
                               for v in items):
        return [v if isinstance(v, str) else None for v in items]
    return None


@dataclass
class Vocab:
    """Values ↔ indices 1..n; 0 is OOV. `kind` is 'int64' for integer ids, else 'string'."""

    values: list[Any]
    kind: str = "string"
    _index: pd.Index | None = field(default=None, repr=False, compare=False)
    _positions: dict[Any, int] | None = field(default=None, repr=False, compare=False)
    _value_set: pa.Array | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.values) + 1

    @classmethod
    def fit(cls, values: pd.Series, kind: str = "string", min_count: int = 1) -> "Vocab":
        """Distinct non-null values seen at least min_count times, in first-seen order."""
        keys = cls._keys(values, kind).dropna()
        counts = keys.value_counts(sort=False)
        kept = counts.index[counts.to_numpy() >= min_count]
        first_seen = pd.Index(keys.drop_duplicates())
        ordered = first_seen[first_seen.isin(kept)]
        return cls(values=[int(v) if kind == "int64" else str(v) for v in ordered], kind=kind)

    @staticmethod
    def _keys(values: pd.Series, kind: str) -> pd.Series:
        s = pd.Series(values).reset_index(drop=True)
        if kind != "int64":
            return _category_keys(s)
        if pd.api.types.is_integer_dtype(s):
            return s.astype("Int64")
        # ids read back as floats (a join met a null) or strings of digits: anything non-integral is OOV
        num = pd.to_numeric(s, errors="coerce")
        return num.where(num % 1 == 0).astype("Int64")

    def lookup(self, values: pd.Series | np.ndarray | list | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Indices (int64) of values; unknown and null → 0."""
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            fast = self.lookup_arrow(_arrow_values(values)) if len(values) > SMALL_LOOKUP else None
            return fast if fast is not None else self.lookup(values.to_numpy(zero_copy_only=False))
        if len(values) <= SMALL_LOOKUP:
            fast = self._lookup_small(values)
            if fast is not None:
                return fast
        else:
            arrow = _arrow_values(values)
            fast = None if arrow is None else self.lookup_arrow(arrow)
            if fast is not None:
                return fast
        return self._lookup_pandas(values)

    def _lookup_pandas(self, values: pd.Series | np.ndarray | list) -> np.ndarray:
        """lookup by the key rules spelled out in pandas (`_keys`): every dtype."""
        if self._index is None:
            dtype = "Int64" if self.kind == "int64" else object
            self._index = pd.Index(pd.array(self.values, dtype=dtype))
        keys = self._keys(pd.Series(values, dtype=object if len(values) == 0 else None), self.kind)
        pos = self._index.get_indexer(keys.astype(self._index.dtype))
        out = pos.astype(np.int64) + 1  # -1 (missing) becomes 0 = OOV
        out[keys.isna().to_numpy()] = OOV
        return out

    def lookup_arrow(self, values: pa.Array) -> np.ndarray | None:
        """The indices `lookup` gives, for an arrow array, hashed by arrow (pc.index_in) where the key
        rules are plain: strings for a string vocabulary (integers print as their digits, as str()
        does), integers for an int64 one. The training stream's history and hard-negative lists are
        tens of millions of ids: keyed one by one in Python (`_category_keys`), string ids took ~15 s
        of each stream of the 700k bench shape. None for other types (floats, whose keys depend on the
        whole column; booleans; dictionaries): the caller takes the pandas path."""
        kind = values.type
        if self.kind == "int64" and pa.types.is_integer(kind):
            value_type = pa.int64()
        elif self.kind != "int64" and (pa.types.is_integer(kind) or pa.types.is_string(kind)
                                       or pa.types.is_large_string(kind)):
            value_type = pa.string()
        else:
            return None
        try:
            keys = values.cast(value_type)
        except pa.ArrowException:          # e.g. uint64 beyond int64
            return None
        if self._value_set is None or self._value_set.type != value_type:
            self._value_set = pa.array(self.values, type=value_type)
        pos = pc.fill_null(pc.index_in(keys, value_set=self._value_set), -1)
        return pos.to_numpy(zero_copy_only=False).astype(np.int64) + 1     # -1 (missing, null) -> 0 = OOV

    def _lookup_small(self, values: pd.Series | np.ndarray | list) -> np.ndarray | None:
        """The same indices as the pandas path for a few values (a serving request: one user's features
        and history), by a dict: pandas costs ~0.2 ms per call, this a few µs. None for dtypes whose
        key rules it does not spell out (the caller then takes the pandas path)."""
        keys = _small_keys(values, self.kind)
        if keys is None:
            return None
        if self._positions is None:
            self._positions = {v: i + 1 for i, v in enumerate(self.values)}
        get = self._positions.get
        return np.fromiter((OOV if k is None else get(k, OOV) for k in keys), dtype=np.int64, count=len(keys))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": self.values}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Vocab":
        return cls(values=list(d["values"]), kind=d["kind"])
