"""The data contract (docs/DATA.md): find, check, read and normalize a source directory.

Everything here works on pyarrow tables so that types stay exact (ids are int64 or string, never
float; timestamps are timestamp[us, UTC]). Semantic problems (nulls, duplicates, unknown ids) pass
through untouched: they are the validate stage's job. Structural problems (a missing file or column,
an unreadable file, a value that cannot have its declared type) raise DataContractError naming the
file and the problem.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from flows.errors import DataContractError
from flows.params import DataParams, FeatureKinds
from flows.sources.normalize import (
    KINDS,
    first_line,
    normalize_entities,
    normalize_interactions,
    normalize_logs,
)

REQUIRED: dict[str, tuple[str, ...]] = {
    "interactions": ("user_id", "item_id", "timestamp"),
    "users": ("user_id",),
    "items": ("item_id",),
    "ranking_logs": ("request_id", "user_id", "item_id", "timestamp", "stage", "position",
                     "ranker_score", "clicked"),
}
LOG_STAGES: tuple[str, ...] = ("retrieved", "ranked", "shown")
# Below this many rows a table is too small to call a column "free text" from its distinct count.
FREE_TEXT_MIN_ROWS = 20
FREE_TEXT_DISTINCT_SHARE = 0.9
# A file this wide is an export mistake (one column per id, a pivot), not a feature table: refuse
# it before the suites, the Feast schema and the encoders grow one entry per column.
MAX_COLUMNS = 1000


@dataclass(frozen=True)
class SourceFiles:
    users: Path
    items: Path
    interactions: Path
    ranking_logs: Path | None

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the files (what `make` would look at): changes
        when a file is replaced or edited, without reading the data."""
        h = hashlib.sha256()
        for path in (self.users, self.items, self.interactions, self.ranking_logs):
            if path is not None:
                st = path.stat()
                h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Tables:
    users: pa.Table
    items: pa.Table
    interactions: pa.Table
    ranking_logs: pa.Table | None


def _find(source: Path, name: str) -> Path | None:
    # parquet wins over csv when both exist: it carries exact types.
    for ext in ("parquet", "csv"):
        if (source / f"{name}.{ext}").is_file():
            return source / f"{name}.{ext}"
    return None


def locate(source: Path, want_logs: bool) -> SourceFiles:
    """The contract files of a source directory (ranking logs only when wanted and present)."""
    if not source.exists():
        raise DataContractError(f"{source}: data source does not exist (data.source is 'demo' or a directory)")
    if not source.is_dir():
        raise DataContractError(f"{source}: data source is not a directory")
    found: dict[str, Path] = {}
    for name in ("interactions", "users", "items"):
        path = _find(source, name)
        if path is None:
            raise DataContractError(f"{source / (name + '.parquet')}: required file missing "
                                    f"(expected {name}.parquet or {name}.csv)")
        found[name] = path
    logs = _find(source, "ranking_logs") if want_logs else None
    return SourceFiles(found["users"], found["items"], found["interactions"], logs)


def _csv_options(path: Path) -> pacsv.ConvertOptions:
    # Ids and request ids are read as text; _normalize_ids turns canonical integers back into int64.
    return pacsv.ConvertOptions(column_types={c: pa.string() for c in ("user_id", "item_id", "request_id")})


def read_schema(path: Path) -> pa.Schema:
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path)
        with pacsv.open_csv(path, convert_options=_csv_options(path)) as reader:
            return reader.schema
    except (pa.ArrowException, OSError) as exc:
        kind = "parquet" if path.suffix == ".parquet" else "CSV"
        raise DataContractError(f"{path}: not a readable {kind} file ({first_line(exc)})") from exc


def read_table(path: Path) -> pa.Table:
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        table = pacsv.read_csv(path, convert_options=_csv_options(path))
    except (pa.ArrowException, OSError) as exc:
        if "invalid UTF8" in str(exc):
            raise DataContractError(f"{path}: not UTF-8 text in an id column ({first_line(exc)}); "
                                    "save the file as UTF-8") from exc
        raise DataContractError(f"{path}: could not be read ({first_line(exc)})") from exc
    table = _empty_text_as_null(table)
    for field in table.schema:
        # pyarrow reads text that is not valid UTF-8 as binary; it would be dropped as "not a feature"
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            bad = next((v for v in table[field.name].to_pylist() if v is not None and not _utf8(v)), b"")
            raise DataContractError(f"{path}: column '{field.name}' is not UTF-8 text (e.g. {bad[:40]!r}); "
                                    "save the file as UTF-8")
    return table


def _empty_text_as_null(table: pa.Table) -> pa.Table:
    """An empty CSV cell is a missing value in a text column too, as it is in a numeric one (pyarrow
    reads it as ""): a categorical feature gets no "" category, a multi-valued one no [""], an empty id
    is a missing id (validate names it). Other text ("NA", "null") is kept as written, like ids."""
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            column = table.column(i)
            empty = pc.equal(column, "")
            if pc.any(empty).as_py():
                table = table.set_column(i, field, pc.if_else(empty, pa.scalar(None, field.type), column))
    return table


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def check_columns(path: Path, schema: pa.Schema, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise DataContractError(f"{path}: missing required column{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(repr(c) for c in missing)} (has: {', '.join(schema.names)})")


def check_declared(path: Path, schema: pa.Schema, id_col: str, kinds: FeatureKinds) -> None:
    """Declared feature columns must exist, appear under one kind only, and not be the id."""
    seen: dict[str, str] = {}
    for kind in KINDS:
        for col in getattr(kinds, kind) or []:
            if col == id_col:
                raise DataContractError(f"{path}: '{col}' is the id column and cannot be declared a {kind} feature")
            if col not in schema.names:
                raise DataContractError(f"{path}: declared {kind} feature column '{col}' does not exist "
                                        f"(has: {', '.join(schema.names)})")
            if col in seen:
                raise DataContractError(f"{path}: column '{col}' is declared both {seen[col]} and {kind}")
            seen[col] = kind


def check_directory(source: Path, data: DataParams) -> SourceFiles:
    """Every structural check that needs only file footers/headers; reads no data, writes nothing."""
    files = locate(source, want_logs=data.ranking_logs == "auto")
    for name in ("interactions", "users", "items", "ranking_logs"):
        path = getattr(files, name)
        if path is None:
            continue
        schema = read_schema(path)
        if len(schema.names) > MAX_COLUMNS:
            raise DataContractError(f"{path}: {len(schema.names)} columns, more than the {MAX_COLUMNS} towerflow "
                                    "reads; keep the id, the required columns and the features you use")
        check_columns(path, schema, REQUIRED[name])
        if name == "users":
            check_declared(path, schema, "user_id", data.user_features)
        if name == "items":
            check_declared(path, schema, "item_id", data.item_features)
    return files


# ---------------------------------------------------------------------------------- feature kinds

def _natural_kind(table: pa.Table, col: str) -> str:
    """What an undeclared column is used as: a feature kind, or 'ignored'."""
    typ = table.schema.field(col).type
    if pa.types.is_dictionary(typ):  # a pandas 'category' column: declared categorical by its dtype
        return "categorical"
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return "multi"
    if pa.types.is_boolean(typ):
        return "categorical"
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return "numeric"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        column = table[col]
        valid = len(column) - column.null_count
        distinct = pc.count_distinct(column, mode="only_valid").as_py()
        # Titles, descriptions, free-form ids: (almost) one value per row teaches a model nothing.
        if valid >= FREE_TEXT_MIN_ROWS and distinct >= FREE_TEXT_DISTINCT_SHARE * valid:
            return "ignored"
        return "categorical"
    return "ignored"  # timestamps, structs, binary: not a feature kind the towers understand


def feature_kinds(table: pa.Table, id_col: str, declared: FeatureKinds) -> dict[str, list[str]]:
    """A declared kind is taken as given; a null kind is inferred from the undeclared columns."""
    taken = {c for k in KINDS for c in (getattr(declared, k) or [])}
    free = [c for c in table.column_names if c != id_col and c not in taken]
    natural = {c: _natural_kind(table, c) for c in free}
    kinds: dict[str, list[str]] = {}
    for kind in KINDS:
        given = getattr(declared, kind)
        kinds[kind] = list(given) if given is not None else [c for c in free if natural[c] == kind]
    used = {c for k in KINDS for c in kinds[k]}
    kinds["ignored"] = [c for c in table.column_names if c != id_col and c not in used]
    return kinds


# ---------------------------------------------------------------------------------- normalization

def unify_ids(tables: Tables) -> Tables:
    """One type per id across files: if any file has string user ids, all get string user ids."""
    out = tables
    for key, names in (("user_id", ("users", "interactions", "ranking_logs")),
                       ("item_id", ("items", "interactions", "ranking_logs"))):
        present = [n for n in names if getattr(out, n) is not None]
        if all(getattr(out, n).schema.field(key).type == pa.int64() for n in present):
            continue
        for n in present:
            t = getattr(out, n)
            t = t.set_column(t.schema.get_field_index(key), key, pc.cast(t[key], pa.string()))
            out = replace(out, **{n: t})
    return out


def keep_first_users(tables: Tables, n: int) -> Tables:
    """The first n users by sorted id, their interactions and logs; the item catalog stays whole."""
    ids = pc.unique(pc.drop_null(tables.users["user_id"]))
    keep = pc.array_take(ids, pc.array_sort_indices(ids))[:n]
    mask = lambda t: pc.fill_null(pc.is_in(t["user_id"], value_set=keep), False)  # noqa: E731
    logs = tables.ranking_logs
    return Tables(users=tables.users.filter(mask(tables.users)), items=tables.items,
                  interactions=tables.interactions.filter(mask(tables.interactions)),
                  ranking_logs=None if logs is None else logs.filter(mask(logs)))


def read_source(files: SourceFiles, data: DataParams) -> tuple[Tables, dict[str, dict[str, list[str]]]]:
    """Read and normalize the contract files; returns the tables and the feature kinds per table."""
    users_raw, items_raw = read_table(files.users), read_table(files.items)
    kinds = {"user_features": feature_kinds(users_raw, "user_id", data.user_features),
             "item_features": feature_kinds(items_raw, "item_id", data.item_features)}
    logs = None
    if files.ranking_logs is not None:
        logs = normalize_logs(files.ranking_logs, read_table(files.ranking_logs))
    tables = Tables(
        users=normalize_entities(files.users, users_raw, "user_id", kinds["user_features"]),
        items=normalize_entities(files.items, items_raw, "item_id", kinds["item_features"]),
        interactions=normalize_interactions(files.interactions, read_table(files.interactions)),
        ranking_logs=logs,
    )
    tables = unify_ids(tables)
    if data.max_users is not None:
        tables = keep_first_users(tables, data.max_users)
    return tables, kinds
