"""The frames the reports compare: one row per interaction, described by what a retrieval model is
sensitive to, and the item feature vectors behind Evidently's Diversity and Serendipity.

An interaction row holds its rating/weight, how popular its item is, the item's own features, the
user's features at the time (including the behaviour counts Feast served to the user tower), whether
the user had the item before (repeat) and when it happened (hour of day, day of week). Ids are left
out: they cannot drift in a useful way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.errors import DataContractError, MissingStageInput
from models.encoding import read_scalar_columns

KEYS = ["user_id", "item_id", "timestamp"]
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
MISSING = "<missing>"
BEHAVIOUR = "interactions_"      # interactions_total, interactions_<w>d: the user tower's behaviour counts


@dataclass
class Frame:
    """Interaction rows (aligned with the examples) and which columns are which kind."""

    rows: pd.DataFrame
    numeric: list[str]
    categorical: list[str]

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical


@dataclass
class TrainingData:
    examples: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame | None      # only read for the rating, when the source has one
    schema: dict[str, Any]


def read_parquet(path: Path, upstream: str) -> pd.DataFrame:
    if not path.is_file():
        raise MissingStageInput(f"{path}: not found; run the {upstream} stage first")
    return pd.read_parquet(path)


def read_training(ingested: Path, training_dir: Path) -> TrainingData:
    """data/training/{examples,items}.parquet, schema.json and (for the rating) the interactions."""
    examples_path = training_dir / "examples.parquet"
    if not examples_path.is_file():
        raise MissingStageInput(f"{examples_path}: not found; run the materialize stage first")
    examples = read_scalar_columns(examples_path)    # the reports never read the history lists
    items = read_parquet(training_dir / "items.parquet", "materialize")
    schema_path = ingested / "schema.json"
    if not schema_path.is_file():
        raise MissingStageInput(f"{schema_path}: not found; run the ingest stage first")
    schema = json.loads(schema_path.read_text())
    interactions = read_parquet(ingested / "interactions.parquet", "ingest") if schema.get("has_rating") else None
    for col in KEYS + ["split"]:
        if col not in examples.columns:
            raise DataContractError(f"{examples_path}: column '{col}' is missing")
    return TrainingData(examples, items, interactions, schema)


def utc(ts: pd.Series) -> pd.Series:
    return pd.to_datetime(ts, utc=True).astype("datetime64[us, UTC]")


def categorical(values: pd.Series) -> pd.Series:
    # Strings with an explicit missing level, so a change in missingness shows up as drift too.
    return values.astype(object).where(values.notna(), MISSING).astype(str)


def _ratings(examples: pd.DataFrame, interactions: pd.DataFrame) -> np.ndarray:
    ratings = interactions[KEYS + ["rating"]].assign(timestamp=lambda d: utc(d["timestamp"]))
    ratings = ratings.drop_duplicates(KEYS, keep="last")
    keyed = examples[KEYS].assign(timestamp=utc(examples["timestamp"]))
    joined = keyed.merge(ratings, on=KEYS, how="left", validate="many_to_one")
    return joined["rating"].to_numpy(dtype="float64")


def _add(frame: Frame, name: str, values: Any, numeric: bool) -> None:
    frame.rows[name] = values
    (frame.numeric if numeric else frame.categorical).append(name)


def interaction_frame(data: TrainingData) -> Frame:
    """One row per example (same order), numeric and categorical columns named by their source:
    item_<feature>, user_<feature>, and the interaction's own columns."""
    examples, schema = data.examples, data.schema
    frame = Frame(pd.DataFrame(index=examples.index), [], [])
    if "weight" in examples.columns:
        _add(frame, "weight", examples["weight"].astype("float64"), True)
    if data.interactions is not None and "rating" in data.interactions.columns:
        _add(frame, "rating", _ratings(examples, data.interactions), True)

    # Relative popularity (1 = an average item) rather than a raw count, so that a run with more data
    # is not "drifted" against a smaller one just because every count grew.
    counts = examples["item_id"].value_counts()
    relative = examples["item_id"].map(counts).to_numpy(dtype="float64") / max(counts.mean(), 1.0)
    _add(frame, "item_popularity", np.log1p(relative), True)

    kinds = schema.get("item_features", {})
    item_cols = [c for c in kinds.get("numeric", []) + kinds.get("categorical", []) if c in data.items.columns]
    by_item = data.items.drop_duplicates("item_id").set_index("item_id")[item_cols]
    joined = by_item.reindex(examples["item_id"].to_numpy())
    for col in kinds.get("numeric", []):
        if col in joined.columns:
            _add(frame, f"item_{col}", pd.to_numeric(joined[col], errors="coerce").to_numpy(dtype="float64"), True)
    for col in kinds.get("categorical", []):
        if col in joined.columns:
            _add(frame, f"item_{col}", categorical(joined[col]).to_numpy(), False)

    kinds = schema.get("user_features", {})
    behaviour = [c for c in examples.columns if c.startswith(BEHAVIOUR) and pd.api.types.is_numeric_dtype(examples[c])]
    for col in [c for c in kinds.get("numeric", []) if c in examples.columns] + behaviour:
        _add(frame, f"user_{col}", pd.to_numeric(examples[col], errors="coerce").astype("float64"), True)
    for col in kinds.get("categorical", []):
        if col in examples.columns:
            _add(frame, f"user_{col}", categorical(examples[col]), False)

    ts = utc(examples["timestamp"])
    # "repeat" when the user had this item before (in time order): rating data has none, event data
    # its own share; a replayed or double-logged stream shows here and in no marginal of the other
    # columns. Categorical: the share of repeats compared as a distribution, so a few repeats after
    # none (a re-rated item) stay a small distance, where a numeric 0/1 scaled by a zero std explodes.
    order = np.argsort(ts.to_numpy(), kind="stable")
    repeat = np.empty(len(examples), dtype=bool)
    repeat[order] = examples[["user_id", "item_id"]].iloc[order].duplicated().to_numpy()
    _add(frame, "repeat", np.where(repeat, "repeat", "first"), False)
    _add(frame, "hour_of_day", ts.dt.hour.astype("float64"), True)
    _add(frame, "day_of_week", ts.dt.dayofweek.map(dict(enumerate(DAYS))), False)
    return frame


def informative(ref: pd.DataFrame, cur: pd.DataFrame, columns: list[str]) -> list[str]:
    """Columns present on both sides with more than one value across them (a constant column cannot
    drift and makes the statistical tests divide by zero)."""
    shared = [c for c in columns if c in ref.columns and c in cur.columns]
    both = pd.concat([ref[shared], cur[shared]])
    return [c for c in shared if both[c].nunique(dropna=True) > 1]


def bounded(rows: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    """A uniform sample of at most max_rows rows (all of them when fewer), in their original order."""
    if len(rows) <= max_rows:
        return rows.reset_index(drop=True)
    return rows.sample(n=max_rows, random_state=seed).sort_index().reset_index(drop=True)


def item_feature_vectors(items: pd.DataFrame, schema: dict[str, Any], max_values: int = 50) -> pd.DataFrame:
    """item_id + one numeric column per feature value: multi-hot genres/tags, one-hot categories (the
    max_values most frequent of each column) and min-max scaled numeric features. Evidently's
    Diversity and Serendipity take the cosine distance between these vectors."""
    items = items.drop_duplicates("item_id").reset_index(drop=True)
    kinds = schema.get("item_features", {})
    parts: dict[str, np.ndarray] = {}
    for col in kinds.get("multi", []) + kinds.get("categorical", []):
        if col not in items.columns:
            continue
        lists = items[col].map(lambda v: list(v) if isinstance(v, (list, np.ndarray)) else ([] if pd.isna(v) else [v]))
        exploded = lists.explode().dropna().astype(str)
        for value in exploded.value_counts().index[:max_values]:
            parts[f"{col}={value}"] = lists.map(lambda vs, value=value: float(value in map(str, vs))).to_numpy()
    for col in kinds.get("numeric", []):
        if col in items.columns:
            values = pd.to_numeric(items[col], errors="coerce").astype("float64")
            span = values.max() - values.min()
            scaled = (values - values.min()) / span if span > 0 else values * 0.0
            parts[f"{col}_scaled"] = scaled.fillna(0.0).to_numpy()
    return pd.DataFrame({"item_id": items["item_id"].to_numpy(), **parts})
