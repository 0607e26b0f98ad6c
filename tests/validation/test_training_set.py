"""The training-set gate (validation/training_set.py): real GX suites on a hand-built training set."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.validation.contract_data import ingested_tables
from validation.errors import ValidationFailed
from validation.params import ValidateParams
from validation.training_set import validate_training_set

# The behaviour count columns of _examples, the total first (materialize passes Feast's).
COUNTS = ["interactions_total", "interactions_7d"]


def _examples(ingested: Path) -> pd.DataFrame:
    """A training set shaped like materialize's examples.parquet, built by hand from the tables."""
    inter = pd.read_parquet(ingested / "interactions.parquet")
    users = pd.read_parquet(ingested / "users.parquet")
    ex = inter[["user_id", "item_id", "timestamp", "weight"]].assign(
        split=["test" if i % 5 == 0 else "train" for i in range(len(inter))])
    ex = ex.merge(users, on="user_id", how="left")
    total = ex.groupby("user_id").cumcount()
    return ex.assign(recent_items=[[] for _ in range(len(ex))], interactions_total=total,
                     interactions_7d=total.clip(upper=2))


def test_training_set_validation(tmp_path: Path):
    clean = ingested_tables(tmp_path / "ingested")
    schema = json.loads((clean / "schema.json").read_text())
    good = _examples(clean)

    def run(frame: pd.DataFrame) -> dict:
        path = tmp_path / "examples.parquet"      # materialize checks the file it built, batch by batch
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
        return validate_training_set(ValidateParams(), path, schema, clean, COUNTS, tmp_path / "gx",
                                     tmp_path / "docs")

    summary = run(good)
    assert summary["success"] and summary["tables"]["training"]["rows"] == len(good)
    assert (tmp_path / "docs" / "index.html").exists()
    assert json.loads((tmp_path / "docs" / "summary.json").read_text())["success"]
    assert json.loads((tmp_path / "gx" / "volume.json").read_text())["rows"]["training"] == len(good)
    bad = good.iloc[1:].copy()
    bad.loc[bad.index[0], "item_id"] = 99999
    bad.loc[bad.index[1], "split"] = "valid"
    bad["gender"] = None
    with pytest.raises(ValidationFailed) as err:
        run(bad)
    message = str(err.value)
    for text in ["training set validation failed: 3 expectations on 1 table", "docs/index.html",
                 f"training: not one row per interaction ({len(good)} interactions) "
                 f"[expect_column_values_to_be_between] observed {len(good) - 1}",
                 "training.item_id: not in items.item_id", "99999",
                 "training.split: split not in ['train', 'test']", "valid",
                 "warning: training.gender: more than 10% nulls"]:
        assert text in message, f"{text!r} not in:\n{message}"
    counts = good.copy()
    counts.loc[counts.index[3], "interactions_7d"] = counts.loc[counts.index[3], "interactions_total"] + 1
    counts.loc[counts.index[4], "interactions_total"] = -1
    with pytest.raises(ValidationFailed) as err:
        run(counts)
    for text in ["training.interactions_total: negative count", "-1",
                 "training.interactions_7d: window count above interactions_total"]:
        assert text in str(err.value), f"{text!r} not in:\n{err.value}"
