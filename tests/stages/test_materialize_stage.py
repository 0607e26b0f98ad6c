"""Stage materialize: real Feast (file offline store, SQLite online store) on a tiny contract dataset."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.params import FeaturesParams
from features.store import open_store
from datagen import make_contract_dataset
from flows.errors import DataContractError, MissingStageInput
from flows.stages.materialize import materialize
from models.params import SplitParams
from models.split import temporal_split
from tests.fresh import modules_imported
from tests.features.feature_data import (
    HISTORY,
    contract_schema,
    expected_count,
    expected_recent,
    ingested_tables,
)
from validation.errors import ValidationFailed
from validation.params import ValidateParams
from validation.training_set import TrainingSetChecks

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first

SPLIT = SplitParams(test_fraction=0.2, min_user_interactions=5)


@pytest.fixture(scope="module", params=[False, True], ids=["int_ids", "string_ids"])
def run(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("string" if request.param else "int")
    ing = ingested_tables(root, request.param)
    dirs = {"features_dir": root / "features", "feast_dir": root / "feast",
            "training_dir": root / "training"}
    # string ids: joined and written 7 examples at a time (features.join_rows), each slice a row group
    features = FeaturesParams(history_length=HISTORY, join_rows=7 if request.param else 1_000_000)
    summary = materialize(SPLIT, features, ing, **dirs)
    return {"root": root, "ingested": ing, "summary": summary, "string_ids": request.param,
            "schema": contract_schema(request.param), **dirs}


def test_examples_keep_every_interaction_in_order(run):
    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    assert inter.duplicated(["user_id", "timestamp"]).sum() >= 6      # the fixture has the tie case
    table = pq.read_table(run["training_dir"] / "examples.parquet")
    assert table.column_names == ["user_id", "item_id", "timestamp", "weight", "split",
                                  "age_bucket", "gender", "occupation", "age", "recent_items",
                                  "interactions_total", "interactions_1d", "interactions_7d",
                                  "interactions_30d"]
    id_type = pa.string() if run["string_ids"] else pa.int64()
    assert table.schema.field("user_id").type == id_type
    assert table.schema.field("recent_items").type == pa.list_(id_type)
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("age").type == pa.int64()
    ex = table.to_pandas()
    assert len(ex) == len(inter) == run["summary"]["examples"]
    for col in ["user_id", "item_id", "weight"]:
        assert ex[col].tolist() == inter[col].tolist()
    assert (ex["timestamp"] == inter["timestamp"]).all()


def test_examples_are_joined_and_written_a_slice_at_a_time(run):
    meta = pq.ParquetFile(run["training_dir"] / "examples.parquet").metadata
    n = run["summary"]["examples"]
    slices = -(-n // 7) if run["string_ids"] else 1
    assert meta.num_rows == n and meta.num_row_groups == slices > (1 if run["string_ids"] else 0)
    assert not (run["training_dir"] / ".examples.partial.parquet").exists()


def test_recent_items_are_strictly_before_each_example(run):
    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    ex = pd.read_parquet(run["training_dir"] / "examples.parquet")
    when = dict(zip(zip(inter["user_id"], inter["item_id"]), inter["timestamp"]))
    for row in ex.itertuples():
        recent = list(row.recent_items)
        assert recent == expected_recent(inter, row.user_id, row.timestamp, HISTORY)
        assert row.item_id not in recent
        assert all(when[(row.user_id, i)] < row.timestamp for i in recent)
    first = ex.sort_values("timestamp").groupby("user_id").head(1)
    assert all(len(r) == 0 for r in first["recent_items"])


def test_behaviour_counts_are_windows_strictly_before_each_example(run):
    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    ex = pd.read_parquet(run["training_dir"] / "examples.parquet")
    windows = {"interactions_total": None, "interactions_1d": 1, "interactions_7d": 7,
               "interactions_30d": 30}
    for row in ex.itertuples():
        for col, days in windows.items():
            assert getattr(row, col) == expected_count(inter, row.user_id, row.timestamp, days), col
    # the windows are not degenerate on this data
    assert ex["interactions_7d"].between(1, ex["interactions_total"].max() - 1).any()
    assert (ex["interactions_30d"] <= ex["interactions_total"]).all()


def test_user_features_and_split_joined(run):
    users = pd.read_parquet(run["ingested"] / "users.parquet").set_index("user_id")
    ex = pd.read_parquet(run["training_dir"] / "examples.parquet")
    for col in ["age_bucket", "gender", "occupation", "age"]:
        assert ex[col].tolist() == users.loc[ex["user_id"], col].tolist()
    assert ex["split"].tolist() == temporal_split(ex, SPLIT).tolist()
    counts = json.loads((run["training_dir"] / "split.json").read_text())
    assert counts["train_rows"] + counts["test_rows"] == len(ex)
    assert counts["test_rows"] == int((ex["split"] == "test").sum()) > 0
    assert counts["users"] == ex["user_id"].nunique()
    assert counts["users_evaluated"] == ex.loc[ex["split"] == "test", "user_id"].nunique()


def test_item_catalog_comes_back_from_feast(run):
    items = pd.read_parquet(run["ingested"] / "items.parquet")
    catalog = pq.read_table(run["training_dir"] / "items.parquet")
    assert catalog.column_names == ["item_id", "title", "year", "genres"]
    assert catalog.schema.field("year").type == pa.int64()
    assert catalog.schema.field("genres").type == pa.list_(pa.string())
    got = catalog.to_pandas()
    assert got["item_id"].tolist() == items["item_id"].tolist()
    assert got["year"].tolist() == items["year"].tolist()
    assert [list(g) for g in got["genres"]] == [list(g) for g in items["genres"]]


def test_missing_and_bad_inputs_are_named(tmp_path):
    dirs = {"features_dir": tmp_path / "f", "feast_dir": tmp_path / "s", "training_dir": tmp_path / "t"}
    with pytest.raises(MissingStageInput, match="schema.json"):
        materialize(SPLIT, FeaturesParams(), tmp_path / "nowhere", **dirs)
    ing = make_contract_dataset(tmp_path / "ingested", n_users=5, n_items=10, per_user=(2, 4))
    inter = pd.read_parquet(ing / "interactions.parquet").assign(weight=1.0)
    inter.to_parquet(ing / "interactions.parquet", index=False)
    schema = contract_schema(False)
    schema["user_features"] = {"categorical": ["recent_items"], "numeric": [], "multi": []}
    (ing / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(DataContractError, match="recent_items.*reserved"):
        materialize(SPLIT, FeaturesParams(), ing, **dirs)
    schema["user_features"] = {"categorical": ["shoe_size"], "numeric": [], "multi": []}
    (ing / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(DataContractError, match="shoe_size"):
        materialize(SPLIT, FeaturesParams(), ing, **dirs)


def test_a_split_without_test_or_train_rows_stops_naming_the_setting(tmp_path):
    """Users with at most 4 interactions each: with split.min_user_interactions 5 nobody is held out,
    so evaluate would have nothing to score after sample and train ran; materialize stops first."""
    ing = ingested_tables(tmp_path / "ingested", False)
    inter = pd.read_parquet(ing / "interactions.parquet")
    inter = inter.groupby("user_id", sort=False).head(4)
    inter.to_parquet(ing / "interactions.parquet", index=False)
    dirs = {"features_dir": tmp_path / "f", "feast_dir": tmp_path / "s", "training_dir": tmp_path / "t"}
    most = int(inter["user_id"].value_counts().max())
    with pytest.raises(DataContractError, match=f"no test rows: only users with at least "
                                                f"split.min_user_interactions=5 interactions .* is {most}; lower"):
        materialize(SPLIT, FeaturesParams(), ing, **dirs)
    assert not (tmp_path / "t" / "examples.parquet").exists()
    with pytest.raises(DataContractError, match="no train rows: .*min_user_interactions=1"):
        materialize(SplitParams(test_fraction=0.2, min_user_interactions=1),
                    FeaturesParams(), _one_each(ing, tmp_path / "once"), **dirs)
    summary = materialize(SplitParams(test_fraction=0.2, min_user_interactions=2), FeaturesParams(), ing, **dirs)
    assert summary["test_rows"] > 0 and summary["train_rows"] > 0


def _one_each(ing: Path, out: Path) -> Path:
    """A copy of the ingested tables where every user has one interaction."""
    import shutil

    shutil.copytree(ing, out)
    inter = pd.read_parquet(out / "interactions.parquet")
    inter.drop_duplicates("user_id").to_parquet(out / "interactions.parquet", index=False)
    return out


def test_without_count_windows_only_the_total_is_built_in_a_process_without_torch(tmp_path):
    """In a fresh interpreter, as the stage runs: Feast is imported without torch (1.7-2.8 s of every
    materialize process on a 2-core machine) and torch stays importable after."""
    ing = ingested_tables(tmp_path, False)
    dirs = {"features_dir": tmp_path / "features", "feast_dir": tmp_path / "feast",
            "training_dir": tmp_path / "training"}
    paths = {k: str(v) for k, v in dirs.items()}
    code = f"""
from pathlib import Path
from features.params import FeaturesParams
from flows.stages.materialize import materialize
from models.params import SplitParams
materialize(SplitParams(test_fraction=0.2, min_user_interactions=5),
            FeaturesParams(history_length={HISTORY}, count_windows_days=()), Path({str(ing)!r}),
            **{{k: Path(v) for k, v in {paths!r}.items()}})
"""
    loaded, _ = modules_imported(code, ("torch", "feast"), torch_importable_after=True)
    assert loaded == ["feast"]
    ex = pd.read_parquet(dirs["training_dir"] / "examples.parquet")
    assert [c for c in ex.columns if c.startswith("interactions_")] == ["interactions_total"]
    views = {v.name for v in open_store(dirs["feast_dir"], dirs["features_dir"]).list_feature_views()}
    assert "item_popularity_fv" not in views and "user_history_fv" in views


def test_training_set_is_validated_before_it_is_written(tmp_path, monkeypatch):
    import gc

    import flows.stages.materialize as stage
    from features.history import OfflineSources

    ing = ingested_tables(tmp_path, False)
    dirs = {"features_dir": tmp_path / "features", "feast_dir": tmp_path / "feast",
            "training_dir": tmp_path / "training"}
    checks = TrainingSetChecks(ValidateParams(), context_root=tmp_path / "gx", docs_dir=tmp_path / "docs")
    # the check forks its workers from the stage's process: the join's history (1-2 GB at 10M) is
    # gone by then, or every worker's pages come on top of it (the 10M stage reached 8.2 GB)
    alive_at_check, real_check = [], stage.validate_training_set

    def check(*args, **kwargs):
        # type(), not isinstance: that reads __class__, which some lazy objects answer with a warning
        alive_at_check.append(sum(type(o) is OfflineSources for o in gc.get_objects()))
        return real_check(*args, **kwargs)

    monkeypatch.setattr(stage, "validate_training_set", check)
    summary = materialize(SPLIT, FeaturesParams(history_length=HISTORY), ing, **dirs, checks=checks)
    assert alive_at_check == [0] and summary["history_rows"] > 0
    assert summary["validation_docs"] == str(tmp_path / "docs" / "index.html")
    gate = json.loads((tmp_path / "docs" / "summary.json").read_text())
    assert gate["success"] and gate["tables"]["training"]["rows"] == summary["examples"]
    assert (dirs["training_dir"] / "examples.parquet").exists()


def test_a_training_set_that_fails_its_checks_leaves_the_old_one(tmp_path):
    ing = ingested_tables(tmp_path, False)
    dirs = {"features_dir": tmp_path / "features", "feast_dir": tmp_path / "feast",
            "training_dir": tmp_path / "training"}
    checks = TrainingSetChecks(ValidateParams(), context_root=tmp_path / "gx", docs_dir=tmp_path / "docs")
    materialize(SPLIT, FeaturesParams(history_length=HISTORY, join_rows=60), ing, **dirs, checks=checks)
    before = (dirs["training_dir"] / "examples.parquet").read_bytes()
    inter = pd.read_parquet(ing / "interactions.parquet")
    inter.loc[3, "weight"] = -1.0                     # "negative weight": an error of the training suite
    inter.to_parquet(ing / "interactions.parquet", index=False)
    with pytest.raises(ValidationFailed, match="training set"):
        materialize(SPLIT, FeaturesParams(history_length=HISTORY, join_rows=60), ing, **dirs, checks=checks)
    assert (dirs["training_dir"] / "examples.parquet").read_bytes() == before
    assert not (dirs["training_dir"] / ".examples.partial.parquet").exists()


def test_the_summary_gives_the_memory_high_water_after_each_step(run):
    # the step where it grows holds the stage's peak: what a user bounding memory at scale looks at
    high = run["summary"]["peak_rss_mb_after_step"]
    assert list(high) == ["sources", "online", "point_in_time_join"] == list(run["summary"]["seconds_by_step"])
    values = list(high.values())
    assert values == sorted(values) and values[0] > 50      # a Python process with pandas and Feast
