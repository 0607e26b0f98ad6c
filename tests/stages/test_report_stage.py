"""The drift report: real Evidently on training-format files built from the synthetic dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datagen import make_contract_dataset
from flows.errors import DataContractError, MissingStageInput
from flows.params import ReportParams
from flows.stages.report import report



@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DO_NOT_TRACK", "1")


def training_files(tmp_path: Path, string_ids: bool = False, shift_test: bool = False) -> tuple[Path, Path]:
    """ingested/ (interactions, items, schema.json) and training/ (examples with split, items)."""
    ingested = make_contract_dataset(tmp_path / "ingested", n_users=120, n_items=80, seed=1, string_ids=string_ids)
    users = pd.read_parquet(ingested / "users.parquet")
    items = pd.read_parquet(ingested / "items.parquet")
    inter = pd.read_parquet(ingested / "interactions.parquet").sort_values(["user_id", "timestamp", "item_id"])
    # Each user's last 20% of interactions is the holdout, as materialize does.
    pos = inter.groupby("user_id").cumcount()
    size = inter.groupby("user_id")["item_id"].transform("size")
    inter["split"] = np.where(pos >= np.ceil(size * 0.8), "test", "train")
    if shift_test:
        # The holdout happens at 03:00 and rates everything 5: both must be flagged.
        test = inter["split"] == "test"
        inter.loc[test, "rating"] = 5.0
        inter.loc[test, "timestamp"] = inter.loc[test, "timestamp"].dt.floor("D") + pd.Timedelta(hours=3)
    (ingested / "schema.json").write_text(json.dumps({
        "user_id_dtype": "string" if string_ids else "int64", "item_id_dtype": "string" if string_ids else "int64",
        "user_features": {"categorical": ["age_bucket", "gender", "occupation"], "numeric": [], "multi": []},
        "item_features": {"categorical": [], "numeric": ["year"], "multi": ["genres"]},
        "has_rating": True, "ranking_logs": "none", "source": "test"}))
    inter.drop(columns="split").to_parquet(ingested / "interactions.parquet", index=False)
    examples = inter.drop(columns="rating").merge(users, on="user_id", how="left")
    examples["weight"] = 1.0
    examples["recent_items"] = [[] for _ in range(len(examples))]
    training = tmp_path / "training"
    training.mkdir()
    examples.to_parquet(training / "examples.parquet", index=False)
    items.to_parquet(training / "items.parquet", index=False)
    return ingested, training


def test_report_writes_html_json_and_a_summary(tmp_path: Path) -> None:
    ingested, training = training_files(tmp_path, string_ids=True)
    out = tmp_path / "drift"
    summary = report(ReportParams(drift_share_threshold=0.5), ingested, training, out)
    assert (out / "drift.html").stat().st_size > 10_000
    assert json.loads((out / "drift.json").read_text())["metrics"]
    assert json.loads((out / "summary.json").read_text()) == summary
    cols = set(summary["columns"])
    # weight is constant 1.0 here, so it is left out rather than reported as "no drift".
    assert {"rating", "item_popularity", "item_year", "user_gender", "user_occupation",
            "hour_of_day", "day_of_week"} <= cols and "weight" not in cols
    assert summary["n_columns"] == len(cols)
    assert 0.0 <= summary["drift_share"] <= 1.0
    assert summary["drift_share"] == pytest.approx(summary["n_drifted"] / summary["n_columns"])
    assert summary["dataset_drift"] == (summary["drift_share"] >= 0.5)
    assert summary["current_rows"] > 0 and summary["reference_rows"] > summary["current_rows"]


def test_shifted_holdout_is_flagged(tmp_path: Path) -> None:
    ingested, training = training_files(tmp_path, shift_test=True)
    summary = report(ReportParams(drift_share_threshold=0.1), ingested, training, tmp_path / "drift")
    assert {"rating", "hour_of_day"} <= set(summary["drifted_columns"])
    assert "user_gender" not in summary["drifted_columns"]
    assert summary["dataset_drift"] is True


def test_missing_inputs_and_empty_holdout_are_named(tmp_path: Path) -> None:
    ingested, training = training_files(tmp_path)
    with pytest.raises(MissingStageInput, match="examples.parquet"):
        report(ReportParams(), ingested, tmp_path / "nowhere", tmp_path / "drift")
    examples = pd.read_parquet(training / "examples.parquet")
    examples.assign(split="train").to_parquet(training / "examples.parquet", index=False)
    with pytest.raises(DataContractError, match=r"both splits \(train: \d+, test: 0\)"):
        report(ReportParams(), ingested, training, tmp_path / "drift")
