"""Expectation suites for the ingested tables, built from `schema.json` (docs/ARCHITECTURE.md, ingest).

Each table has a row suite (`<table>`: checks that hold row by row, so a large table can be validated
batch by batch and the counts summed) and, where there is something to check, a profile suite
(`<table>_profile`: means and cardinalities, run on the table or a uniform sample of it). Row counts
are checked in one `volume` suite over a one-row frame of counts, against the previous validated run.

Every expectation carries `meta = {"column", "problem", "check"}` so that a failure is reported in
the user's terms (`interactions.item_id: not in items.item_id`) even when GX checks a derived column,
and so that its severity comes from `validate.severity.<check>`. Referential integrity and unique
keys are checked on derived columns (validation/batches.py) rather than with
`ExpectColumnValuesToBeInSet(value_set=<all ids>)`: a value set is stored in the suite JSON and
rendered into Data Docs, which does not scale to large catalogs. Run-time values (now, the timestamp
floor, volume bounds) are suite parameters, so stored suites change only with schema.json or params.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd

from validation.batches import Derived, Source, UniqueKey, duplicate_hashes
from validation.params import ValidateParams
from validation.rows import (
    NULL_PROBLEM,
    TIMESTAMP_BOUNDS,
    Bound,
    finite,
    id_problem,
    interaction_bounds,
    interaction_columns,
    parameters,
)

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
UNIQUE = {
    "users": UniqueKey(("user_id",), "user_id_duplicate"),
    "items": UniqueKey(("item_id",), "item_id_duplicate"),
    # one item per shown position of a request
    "ranking_logs": UniqueKey(("request_id", "position"), "position_duplicate", "stage", "shown"),
    # the same event twice: a re-delivered export or a double load (validate.max_duplicate_share)
    "interactions": UniqueKey(("user_id", "item_id", "timestamp"), "event_duplicate"),
}


def unknown_column(id_column: str, parent: str) -> str:
    """Name of the derived column holding ids that are missing from the parent table (else null)."""
    return f"{id_column}_not_in_{parent}"


def parent_ids(source: Source, key: str) -> pd.Index:
    """The parent table's ids (only the key column is read)."""
    if key not in source.columns:
        return pd.Index([])
    from validation.batches import to_pandas
    return pd.Index(pd.concat([to_pandas(b)[key] for b in source.batches(10**7, [key])]).dropna().unique())


def derived_columns(table: str, sources: dict[str, Source], parents: dict[str, pd.Index],
                    chunk_rows: int) -> Derived:
    """The derived columns of one table (see validation/batches.py). parents: table -> its ids."""
    derived = Derived()
    for (child, col), parent in REFERENCES.items():
        if child == table:
            derived.references[unknown_column(col, parent)] = (col, parents[parent])
    if table in UNIQUE:
        key = UNIQUE[table]
        derived.unique.append((key, duplicate_hashes(sources[table], key, chunk_rows)))
    return derived


class Expect:
    """Builds expectations with the meta the runner reports from; imports GX on first use."""

    def __init__(self) -> None:
        import great_expectations.expectations as gxe
        from great_expectations.expectations.row_conditions import Column

        self.gxe, self.Column = gxe, Column

    def __call__(self, cls_name: str, about: str | None, check: str, problem: str, **kwargs: Any):
        """An expectation on column `about` (or on kwargs' derived column / column_list)."""
        if about is not None and not {"column", "column_list", "column_A"} & kwargs.keys():
            kwargs["column"] = about
        meta = {"column": about, "problem": problem, "check": check, **kwargs.pop("meta", {})}
        return getattr(self.gxe, cls_name)(meta=meta, **kwargs)

    def exists(self, columns: list[str]) -> list:
        return [self("ExpectColumnToExist", c, "columns", "required column is missing") for c in columns]

    def not_null(self, columns: list[str], check: str = "keys") -> list:
        return [self("ExpectColumnValuesToNotBeNull", c, check, NULL_PROBLEM) for c in columns]

    def id_type(self, column: str, kind: str) -> Any:
        return self("ExpectColumnValuesToBeInTypeList", column, "columns", id_problem(kind),
                    type_list=ID_TYPES[kind])

    def bound(self, rule: Bound) -> Any:
        """A row rule of validation/rows.py; a named bound is a suite parameter."""
        value = lambda v: {"$PARAMETER": v} if isinstance(v, str) else v  # noqa: E731
        limits = {k: value(v) for k, v in (("min_value", rule.min_value), ("max_value", rule.max_value))
                  if v is not None}
        return self("ExpectColumnValuesToBeBetween", rule.column, rule.check, rule.problem, **limits)

    def numeric(self, column: str) -> Any:
        return self("ExpectColumnValuesToBeInTypeList", column, "columns", "must be numeric",
                    type_list=NUMERIC_TYPES)

    def finite(self, column: str) -> Any:
        return self.bound(finite(column))     # NaN is a null: counted by the null checks

    def known(self, table: str, column: str, parent: str) -> Any:
        key = "user_id" if parent == "users" else "item_id"
        derived = unknown_column(column, parent)
        return self("ExpectColumnValuesToBeNull", column, "references", f"not in {parent}.{key}",
                    column=derived, notes=f"Referential integrity: `{derived}` holds {table}.{column} "
                                          f"where it is missing from {parent}.{key}, null elsewhere.")

    def unique(self, key: UniqueKey, about: str, problem: str, mostly: float = 1.0) -> Any:
        return self("ExpectColumnValuesToBeNull", about, "keys", problem, column=key.derived, mostly=mostly,
                    notes=f"Unique key: `{key.derived}` holds ({', '.join(key.columns)}) where it "
                          f"occurs more than once, null elsewhere.")

    def timestamps(self, column: str) -> list:
        return [self.bound(Bound(column, b.problem, b.min_value, b.max_value, b.check)) for b in TIMESTAMP_BOUNDS]

    def null_share(self, columns: list[str], validate_cfg: ValidateParams) -> list:
        return [self("ExpectColumnValuesToNotBeNull", c, "distribution",
                     f"more than {validate_cfg.max_null_share:.0%} nulls",
                     mostly=1 - validate_cfg.max_null_share)
                for c in columns]

    def cardinality(self, columns: list[str], validate_cfg: ValidateParams) -> list:
        lo, hi = validate_cfg.categorical_cardinality
        return [self("ExpectColumnUniqueValueCountToBeBetween", c, "distribution",
                     f"distinct values outside [{lo}, {hi}]", min_value=lo, max_value=hi)
                for c in columns]


def features(schema: dict[str, Any], side: str) -> dict[str, list[str]]:
    kinds = schema.get(f"{side}_features", {})
    return {k: list(kinds.get(k, [])) for k in ("categorical", "numeric", "multi")}


def suite_parameters(now: datetime, validate_cfg: ValidateParams) -> dict[str, Any]:
    """Run-time values of the suites' parameters: `now` must be tz-aware (timestamps are UTC)."""
    return parameters(now, validate_cfg)


def build_suites(schema: dict[str, Any], validate_cfg: ValidateParams) -> dict[str, list]:
    """Table name -> the row-level GX expectations its data must meet (exact batch by batch)."""
    e = Expect()

    def entity(table: str, key: str, kind: str, side: str) -> list:
        feats = features(schema, side)
        cols = [c for k in ("categorical", "numeric", "multi") for c in feats[k]]
        return [*e.exists([key, *cols]), *e.not_null([key]), e.id_type(key, kind),
                e.unique(UNIQUE[table], key, "duplicate ids"),
                *[e.numeric(c) for c in feats["numeric"]], *[e.finite(c) for c in feats["numeric"]],
                *e.null_share(cols, validate_cfg)]

    uid, iid = schema["user_id_dtype"], schema["item_id_dtype"]
    rating = ["rating"] if schema.get("has_rating") else []
    # the row rules (validation/rows.py) are the ones the door and ingest apply to real-time events
    interactions = [
        *e.exists(interaction_columns(schema)),
        e("ExpectTableRowCountToBeBetween", None, "values", "no interactions", min_value=1),
        *e.not_null(interaction_columns(schema)),
        e.id_type("user_id", uid), e.id_type("item_id", iid),
        e.known("interactions", "user_id", "users"), e.known("interactions", "item_id", "items"),
        e.numeric("weight"), *[e.numeric(c) for c in rating],
        *[e.bound(b) for b in interaction_bounds(schema, validate_cfg)],
        e.unique(UNIQUE["interactions"], "user_id",
                 f"more than {validate_cfg.max_duplicate_share:.0%} of rows repeat another row's "
                 "(user_id, item_id, timestamp)", mostly=1 - validate_cfg.max_duplicate_share),
    ]
    shown, not_shown = e.Column("stage") == "shown", e.Column("stage") != "shown"
    logs = [
        *e.exists(["request_id", "user_id", "item_id", "timestamp", "stage", "position",
                   "ranker_score", "clicked"]),
        *e.not_null(["request_id", "user_id", "item_id", "timestamp", "stage", "clicked"]),
        e("ExpectColumnValuesToBeInTypeList", "request_id", "columns", "must be a string",
          type_list=STRING_TYPES),
        e.id_type("user_id", uid), e.id_type("item_id", iid),
        e.known("ranking_logs", "user_id", "users"), e.known("ranking_logs", "item_id", "items"),
        *e.timestamps("timestamp"),
        e("ExpectColumnValuesToBeInSet", "stage", "values", f"stage not in {STAGES}", value_set=STAGES),
        e("ExpectColumnValuesToNotBeNull", "position", "values", "shown row without a position",
          row_condition=shown),
        e("ExpectColumnValuesToBeBetween", "position", "values", "position < 1 on a shown row (1-based)",
          min_value=1, row_condition=shown),
        e("ExpectColumnValuesToBeNull", "position", "values", "position set on a non-shown row",
          row_condition=not_shown),
        e.unique(UNIQUE["ranking_logs"], "position", "two shown rows share a position"),
        e.numeric("ranker_score"),
        e("ExpectColumnValuesToBeOfType", "clicked", "columns", "must be boolean", type_="bool"),
        e("ExpectColumnValuesToBeInSet", "clicked", "values", "click on a non-shown row",
          value_set=[False], row_condition=not_shown),
    ]
    return {
        "users": entity("users", "user_id", uid, "user"),
        "items": entity("items", "item_id", iid, "item"),
        "interactions": interactions,
        "ranking_logs": logs,
    }


def build_profiles(schema: dict[str, Any], validate_cfg: ValidateParams) -> dict[str, list]:
    """Table name -> distribution expectations that need the whole column (run on a sample)."""
    e = Expect()
    out = {side + "s": e.cardinality(features(schema, side)["categorical"], validate_cfg)
           for side in ("user", "item")}
    if schema.get("has_rating") and validate_cfg.rating_mean is not None:
        lo, hi = validate_cfg.rating_mean
        out["interactions"] = [e("ExpectColumnMeanToBeBetween", "rating", "distribution",
                                 f"mean rating outside validate.rating_mean [{lo}, {hi}]",
                                 min_value=lo, max_value=hi)]
    return {t: exps for t, exps in out.items() if exps}


def counts_distinct(expectation: Any) -> bool:
    """A cardinality check: run on each column's exact distinct values, not on a sample."""
    return type(expectation).__name__ == "ExpectColumnUniqueValueCountToBeBetween"


def profile_columns(expectations: list) -> list[str]:
    return sorted({e.column for e in expectations if getattr(e, "column", None)})
