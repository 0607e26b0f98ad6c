"""Column types of the data contract: ids, timestamps, features and ranking-log columns read into their
normalized pyarrow types. A value that cannot have its declared type raises DataContractError naming
the file and the column."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flows.errors import ConfigError, DataContractError

KINDS: tuple[str, ...] = ("categorical", "numeric", "multi")
TIMESTAMP = pa.timestamp("us", tz="UTC")
# Canonical decimal integers only: "007" stays a string id so that ids are kept exactly as given.
_CANONICAL_INT = r"^-?(0|[1-9][0-9]{0,17})$"
from flows.int64 import INT64_MAX, INT64_MIN
# At most 40 digits: longer text is no int64 id, and int() of thousands of digits is slow or refused.
CANONICAL_INT = re.compile(r"^-?(0|[1-9][0-9]{0,39})$")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _cast(path: Path, col: str, arr: pa.ChunkedArray, typ: pa.DataType, what: str) -> pa.ChunkedArray:
    try:
        return pc.cast(arr, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataContractError(f"{path}: column '{col}' cannot be read as {what} "
                                f"({first_line(exc)})") from exc


def _id_array(path: Path, col: str, arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """int64 for integer ids (and text that is all canonical integers), string for anything else."""
    typ = arr.type
    if pa.types.is_dictionary(typ):
        arr, typ = pc.cast(arr, typ.value_type), typ.value_type
    if pa.types.is_integer(typ):
        if pa.types.is_unsigned_integer(typ) and (pc.max(arr).as_py() or 0) > INT64_MAX:
            # uint64 ids above int64's range (hashes): kept exactly, as their decimal text
            return pc.cast(arr, pa.string())
        return pc.cast(arr, pa.int64())
    if pa.types.is_floating(typ):
        valid = pc.drop_null(arr)
        if pc.all(pc.equal(valid, pc.floor(valid))).as_py() in (True, None):
            # float only because a CSV column had nulls
            return _cast(path, col, arr, pa.int64(), "integer ids (whole numbers within int64)")
    as_text = pc.cast(arr, pa.string())
    valid = pc.drop_null(as_text)
    if len(valid) and pc.all(pc.match_substring_regex(valid, _CANONICAL_INT)).as_py():
        return pc.cast(as_text, pa.int64())
    return as_text


def coerce_id(value: Any, id_dtype: str, where: str) -> int | str:
    """An id from JSON or a table as the schema's dtype. int64: an integer or its canonical text
    ('7', not '7.0', 'abc' or true); string: text, or an integer taken as its text (ingest unifies
    mixed id columns the same way). `where` names the field in the error."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):   # a numpy scalar
        value = value.item()
    if id_dtype not in ("int64", "string"):
        raise ConfigError(f"schema.json: id dtype must be 'int64' or 'string', got {id_dtype!r}")
    if value is None or (isinstance(value, float) and value != value):   # null, or NaN from a table
        raise DataContractError(f"{where}: missing")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        kind = "an int64" if id_dtype == "int64" else "a string"
        raise DataContractError(f"{where}: {value!r} is not {kind} id")
    if id_dtype == "string":
        return str(value)
    text = value.strip() if isinstance(value, str) else None
    if text is not None and not CANONICAL_INT.match(text):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise DataContractError(f"{where}: {shown!r} is not an int64 id")
    number = int(text) if text is not None else value
    if not INT64_MIN <= number <= INT64_MAX:
        raise DataContractError(f"{where}: {value!r} is out of the int64 range")
    return number


def timestamp_value(value: Any) -> pd.Timestamp:
    """One event timestamp as UTC: ISO 8601 text (naive = UTC) or unix seconds, as `_timestamp`
    reads a column. Raises ValueError naming what is wrong with it."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):   # a numpy scalar
        value = value.item()
    if isinstance(value, bool) or value is None or (isinstance(value, float) and not np.isfinite(value)):
        raise ValueError(f"timestamp {value!r} is neither ISO 8601 text nor unix seconds")
    try:
        if isinstance(value, str) and NUMBER.match(value.strip()):   # CSV text: unix seconds
            value = float(value)
        if isinstance(value, (int, float)):
            ts = pd.Timestamp(float(value), unit="s", tz="UTC")
        elif isinstance(value, str):
            # ISO 8601 only: '03/04/2024' is March or April depending on the writer.
            ts = pd.to_datetime(value.strip(), format="ISO8601", utc=True)
        else:
            ts = pd.Timestamp(value)
            ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    except (pd.errors.OutOfBoundsDatetime, OverflowError):
        raise ValueError(f"timestamp {value!r} is out of range (unix seconds, not milliseconds?)") from None
    except (ValueError, TypeError):
        ts = pd.NaT
    if ts is pd.NaT:
        raise ValueError(f"timestamp {value!r} is neither ISO 8601 text nor unix seconds "
                         "(e.g. '2024-03-04T10:00:00Z' or 1709546400)")
    return ts


def _timestamp(path: Path, col: str, arr: pa.ChunkedArray) -> pa.ChunkedArray:
    typ = arr.type
    if pa.types.is_timestamp(typ):
        # Naive datetimes are taken as UTC (the contract); aware ones are converted.
        return pc.cast(arr, TIMESTAMP, safe=False)
    if pa.types.is_date(typ):
        return pc.cast(pc.cast(arr, pa.timestamp("us")), TIMESTAMP)
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):  # unix seconds
        micros = pc.round(pc.multiply(pc.cast(arr, pa.float64()), 1e6))
        try:
            return pc.cast(pc.cast(micros, pa.int64()), TIMESTAMP)
        except pa.ArrowInvalid as exc:  # beyond int64 microseconds: about the year 294,000
            top = pc.max(pc.abs(pc.cast(arr, pa.float64()))).as_py()
            raise DataContractError(f"{path}: column '{col}' has unix seconds out of range (e.g. {top:.0f}; "
                                    "expected seconds since 1970 UTC, not ms or ns)") from exc
    text = pc.cast(arr, pa.string()).to_pandas()
    # ISO 8601 only: '03/04/2024' is March 4 or April 3 depending on who wrote it. Text with an
    # offset ('Z', '+02:00') is converted to UTC, text without one is UTC. The two are parsed
    # apart: pandas gives naive strings the offset of the first string when they are mixed.
    has_offset = text.str.contains(r"(?:Z|[+-]\d{2}(?::?\d{2})?)$", regex=True, na=False)
    parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns, UTC]")
    for part in (has_offset, ~has_offset & text.notna()):
        if part.any():
            parsed[part] = pd.to_datetime(text[part], utc=True, format="ISO8601", errors="coerce")
    bad = text[parsed.isna() & text.notna()]
    if len(bad):
        raise DataContractError(f"{path}: column '{col}' is neither a datetime nor unix seconds "
                                f"(e.g. {bad.iloc[0]!r}; use ISO 8601 text, e.g. '2024-03-04T10:00:00+02:00', "
                                "or seconds since 1970 UTC)")
    return pa.chunked_array([pa.array(parsed, type=TIMESTAMP)])


def _feature(path: Path, col: str, arr: pa.ChunkedArray, kind: str) -> pa.ChunkedArray:
    typ = arr.type
    if pa.types.is_dictionary(typ):
        arr, typ = pc.cast(arr, typ.value_type), typ.value_type
    if kind == "categorical":
        return _cast(path, col, arr, pa.string(), "a categorical (string)")
    if kind == "numeric":
        return _cast(path, col, arr, pa.float64(), "numeric (float64)")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):  # CSV: multi-valued as "a|b|c"
        return pc.split_pattern(pc.cast(arr, pa.string()), "|")
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
        raise DataContractError(f"{path}: column '{col}' is declared multi-valued but holds {typ} "
                                f"(expected a list column, or 'a|b|c' text in CSV)")
    return _cast(path, col, arr, pa.list_(pa.string()), "a list of strings")


def normalize_entities(path: Path, table: pa.Table, id_col: str, kinds: dict[str, list[str]]) -> pa.Table:
    """Id + feature columns with their normalized types; ignored columns are dropped."""
    cols = {id_col: _id_array(path, id_col, table[id_col])}
    for kind in KINDS:
        for col in kinds[kind]:
            cols[col] = _feature(path, col, table[col], kind)
    return pa.table(cols)


def normalize_interactions(path: Path, table: pa.Table) -> pa.Table:
    cols = {
        "user_id": _id_array(path, "user_id", table["user_id"]),
        "item_id": _id_array(path, "item_id", table["item_id"]),
        "timestamp": _timestamp(path, "timestamp", table["timestamp"]),
    }
    if "rating" in table.column_names:
        cols["rating"] = _cast(path, "rating", table["rating"], pa.float64(), "float64")
    if "weight" in table.column_names:
        cols["weight"] = _cast(path, "weight", table["weight"], pa.float64(), "float64")
    else:
        cols["weight"] = pa.chunked_array([pa.array([1.0] * table.num_rows, pa.float64())])
    return pa.table(cols)


def logs_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    """ranking_logs.parquet schema; its pandas metadata makes `position` read back as pandas Int64."""
    schema = pa.schema([("request_id", pa.string()), ("user_id", user_type), ("item_id", item_type),
                        ("timestamp", TIMESTAMP), ("stage", pa.string()), ("position", pa.int64()),
                        ("ranker_score", pa.float64()), ("clicked", pa.bool_())])
    empty = pd.DataFrame({f.name: pd.Series([], dtype="Int64" if f.name == "position" else object)
                          for f in schema})
    return pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema


def normalize_logs(path: Path, table: pa.Table) -> pa.Table:
    cols = {
        "request_id": pc.cast(table["request_id"], pa.string()),
        "user_id": _id_array(path, "user_id", table["user_id"]),
        "item_id": _id_array(path, "item_id", table["item_id"]),
        "timestamp": _timestamp(path, "timestamp", table["timestamp"]),
        "stage": _cast(path, "stage", table["stage"], pa.string(), "text"),
        "position": _cast(path, "position", table["position"], pa.int64(), "an integer position"),
        "ranker_score": _cast(path, "ranker_score", table["ranker_score"], pa.float64(), "float64"),
        "clicked": _cast(path, "clicked", table["clicked"], pa.bool_(), "bool"),
    }
    for col in table.column_names:     # per-impression context (device, page, grid_row ...): kept
        if col not in cols:
            cols[col] = _context(path, col, table[col])
    return pa.table(cols)


def _context(path: Path, col: str, arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """An optional context column of the ranking logs: integers stay int64, other numbers become
    float64, text / categories / flags become strings (a categorical context for the bias tower)."""
    typ = arr.type
    if pa.types.is_dictionary(typ):
        arr, typ = pc.cast(arr, typ.value_type), typ.value_type
    if pa.types.is_integer(typ):
        return _cast(path, col, arr, pa.int64(), "int64")
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return _cast(path, col, arr, pa.float64(), "float64")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_boolean(typ) or pa.types.is_null(typ):
        return _cast(path, col, arr, pa.string(), "text")
    raise DataContractError(f"{path}: context column '{col}' holds {typ}; ranking_logs context columns must be "
                            f"numbers or text (one value per impression)")
