"""Expectation suites for the ingested tables, built from `schema.json` (docs/ARCHITECTURE.md, ingest).

One suite per table. Every expectation carries `meta = {"column": ..., "problem": ...}` so that a
failure can be reported in the user's terms (`interactions.item_id: not in items.item_id`) even when
GX checks a derived column. Referential integrity is checked on derived columns (see
`add_reference_columns`) rather than with `ExpectColumnValuesToBeInSet(value_set=<all ids>)`: a value
set is stored in the suite JSON and rendered into Data Docs, which does not scale to large catalogs.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd

TABLES = ("users", "items", "interactions", "ranking_logs")
STAGES = ["retrieved", "ranked", "shown"]

# pandas dtype names as ExpectColumnValuesToBeInTypeList resolves them: numpy names, or the pandas
# extension dtype class name ("Int64Dtype"; the alias "Int64" is not recognised by GX 1.24).
INT_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype"]
NUMERIC_TYPES = INT_TYPES + ["float32", "float64", "Float32Dtype", "Float64Dtype"]
STRING_TYPES = ["object", "str", "StringDtype"]
ID_TYPES = {"int64": ["int64", "Int64Dtype"], "string": STRING_TYPES}

# Which id columns must exist in which table: (table, id column) -> parent table.
REFERENCES = {("interactions", "user_id"): "users", ("interactions", "item_id"): "items",
              ("ranking_logs", "user_id"): "users", ("ranking_logs", "item_id"): "items"}


def unknown_column(id_column: str, parent: str) -> str:
    """Name of the derived column holding ids that are missing from the parent table (else null)."""
    return f"{id_column}_not_in_{parent}"


def add_reference_columns(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Copies of the child tables with one derived column per reference: the id where it is unknown.

    Null ids stay null here (the not-null expectation reports them), so the derived column is null
    exactly for the rows that pass. If either id column is missing, no column is derived and the
    suite's expectation on it fails with "column ... does not exist" next to the missing-column one.
    """
    out = dict(frames)
    for (table, col), parent in REFERENCES.items():
        child, par = out[table], frames[parent]
        if col not in child.columns or col not in par.columns:
            continue
        values = child[col]
        out[table] = child.assign(**{unknown_column(col, parent): values.where(~values.isin(par[col]))})
    return out


def suite_parameters(now: datetime) -> dict[str, Any]:
    """Run-time values of the suites' parameters: `now` must be tz-aware (timestamps are UTC)."""
    return {"now": now}


def build_suites(schema: dict[str, Any]) -> dict[str, list]:
    """Table name -> the GX expectations its data must meet.

    Timestamps are bounded by the suite parameter `now` (pass `suite_parameters(...)` at run time), so
    the stored suites stay the same from run to run and change only with schema.json.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def exp(cls: type, about: str | None, problem: str, **kwargs: Any):
        """An expectation on column `about` (or on kwargs' derived column / column_list)."""
        if about is not None and "column" not in kwargs and "column_list" not in kwargs:
            kwargs["column"] = about
        return cls(meta={"column": about, "problem": problem}, **kwargs)

    def exists(columns: list[str]) -> list:
        return [exp(gxe.ExpectColumnToExist, c, "required column is missing") for c in columns]

    def not_null(columns: list[str]) -> list:
        return [exp(gxe.ExpectColumnValuesToNotBeNull, c, "null values") for c in columns]

    def id_type(column: str, kind: str) -> Any:
        return exp(gxe.ExpectColumnValuesToBeInTypeList, column, f"ids must be {kind} (schema.json)",
                   type_list=ID_TYPES[kind])

    def numeric(column: str) -> Any:
        return exp(gxe.ExpectColumnValuesToBeInTypeList, column, "must be numeric",
                   type_list=NUMERIC_TYPES)

    def known(table: str, column: str) -> Any:
        parent = REFERENCES[(table, column)]
        key = "user_id" if parent == "users" else "item_id"
        derived = unknown_column(column, parent)
        return exp(gxe.ExpectColumnValuesToBeNull, column, f"not in {parent}.{key}", column=derived,
                   notes=f"Referential integrity: `{derived}` holds {table}.{column} where it is "
                         f"missing from {parent}.{key}, null elsewhere.")

    def not_future(column: str) -> Any:
        return exp(gxe.ExpectColumnValuesToBeBetween, column,
                   "timestamp in the future (or not tz-aware UTC)", max_value={"$PARAMETER": "now"})

    def entity(key: str, kind: str, features: dict[str, list[str]]) -> list:
        cols = [c for k in ("categorical", "numeric", "multi") for c in features.get(k, [])]
        return [*exists([key, *cols]), *not_null([key]), id_type(key, kind),
                exp(gxe.ExpectColumnValuesToBeUnique, key, "duplicate ids"),
                *[numeric(c) for c in features.get("numeric", [])]]

    uid, iid = schema["user_id_dtype"], schema["item_id_dtype"]
    rating = ["rating"] if schema.get("has_rating") else []
    interactions = [
        *exists(["user_id", "item_id", "timestamp", "weight", *rating]),
        exp(gxe.ExpectTableRowCountToBeBetween, None, "no interactions", min_value=1),
        *not_null(["user_id", "item_id", "timestamp", "weight", *rating]),
        id_type("user_id", uid), id_type("item_id", iid),
        known("interactions", "user_id"), known("interactions", "item_id"),
        not_future("timestamp"),
        numeric("weight"),
        exp(gxe.ExpectColumnValuesToBeBetween, "weight", "negative weight", min_value=0),
        *[numeric(c) for c in rating],
    ]
    shown, not_shown = Column("stage") == "shown", Column("stage") != "shown"
    logs = [
        *exists(["request_id", "user_id", "item_id", "timestamp", "stage", "position",
                 "ranker_score", "clicked"]),
        *not_null(["request_id", "user_id", "item_id", "timestamp", "stage", "clicked"]),
        exp(gxe.ExpectColumnValuesToBeInTypeList, "request_id", "must be a string",
            type_list=STRING_TYPES),
        id_type("user_id", uid), id_type("item_id", iid),
        known("ranking_logs", "user_id"), known("ranking_logs", "item_id"),
        not_future("timestamp"),
        exp(gxe.ExpectColumnValuesToBeInSet, "stage", f"stage not in {STAGES}", value_set=STAGES),
        exp(gxe.ExpectColumnValuesToNotBeNull, "position", "shown row without a position",
            row_condition=shown),
        exp(gxe.ExpectColumnValuesToBeBetween, "position", "position < 1 on a shown row (1-based)",
            min_value=1, row_condition=shown),
        exp(gxe.ExpectColumnValuesToBeNull, "position", "position set on a non-shown row",
            row_condition=not_shown),
        exp(gxe.ExpectCompoundColumnsToBeUnique, "position", "two shown rows share a position",
            column_list=["request_id", "position"], row_condition=shown),
        numeric("ranker_score"),
        exp(gxe.ExpectColumnValuesToBeOfType, "clicked", "must be boolean", type_="bool"),
        exp(gxe.ExpectColumnValuesToBeInSet, "clicked", "click on a non-shown row",
            value_set=[False], row_condition=not_shown),
    ]
    return {
        "users": entity("user_id", uid, schema.get("user_features", {})),
        "items": entity("item_id", iid, schema.get("item_features", {})),
        "interactions": interactions,
        "ranking_logs": logs,
    }
