"""materialize: real Feast (file offline store, SQLite online store) on a tiny contract dataset."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.params import FeaturesParams
from flows.errors import DataContractError, MissingStageInput
from flows.stages.materialize import materialize, point_in_time
from models.params import SplitParams
from models.split import temporal_split
from tests.datagen import make_contract_dataset

HISTORY = 3
SPLIT = SplitParams(test_fraction=0.2, min_user_interactions=5)


def _schema(string_ids: bool) -> dict:
    dtype = "string" if string_ids else "int64"
    return {"user_id_dtype": dtype, "item_id_dtype": dtype,
            "user_features": {"categorical": ["age_bucket", "gender", "occupation"],
                              "numeric": ["age"], "multi": []},
            "item_features": {"categorical": ["title"], "numeric": ["year"], "multi": ["genres"]},
            "has_rating": True, "ranking_logs": "none", "source": "tests"}


def _ingested(root: Path, string_ids: bool) -> Path:
    """Contract tables as ingest writes them, plus the cases the join must survive."""
    ing = make_contract_dataset(root / "ingested", n_users=25, n_items=40, per_user=(4, 14),
                                seed=3, string_ids=string_ids)
    users = pd.read_parquet(ing / "users.parquet")
    users["age"] = np.arange(len(users), dtype="int64") + 18
    lonely = "u9999" if string_ids else 9999          # a user with no interactions at all
    users = pd.concat([users, users.iloc[[0]].assign(user_id=lonely)], ignore_index=True)
    users.to_parquet(ing / "users.parquet", index=False)

    inter = pd.read_parquet(ing / "interactions.parquet")
    inter["weight"] = 1.0
    # Same user, same timestamp, different items (feast#6787 would collapse these): give each of
    # the first three users' 2nd-4th interactions the time of the 2nd.
    for u in users["user_id"].iloc[:3]:
        idx = inter.index[inter["user_id"] == u][1:4]
        inter.loc[idx, "timestamp"] = inter.loc[idx[0], "timestamp"]
    inter = inter.sample(frac=1.0, random_state=0).reset_index(drop=True)   # file order != time order
    inter.to_parquet(ing / "interactions.parquet", index=False)
    (ing / "schema.json").write_text(json.dumps(_schema(string_ids)))
    return ing


@pytest.fixture(scope="module", params=[False, True], ids=["int_ids", "string_ids"])
def run(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("string" if request.param else "int")
    ing = _ingested(root, request.param)
    dirs = {"features_dir": root / "features", "feast_dir": root / "feast",
            "training_dir": root / "training"}
    summary = materialize(ing, SPLIT, FeaturesParams(history_length=HISTORY), **dirs)
    return {"root": root, "ingested": ing, "summary": summary, "string_ids": request.param,
            "schema": _schema(request.param), **dirs}


def _expected_recent(inter: pd.DataFrame, user, at: pd.Timestamp, n: int) -> list:
    """Brute force: the user's items strictly before `at`, newest first (ties: larger item first)."""
    before = inter[(inter["user_id"] == user) & (inter["timestamp"] < at)]
    return before.sort_values(["timestamp", "item_id"], ascending=False)["item_id"].tolist()[:n]


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


def test_recent_items_are_strictly_before_each_example(run):
    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    ex = pd.read_parquet(run["training_dir"] / "examples.parquet")
    when = dict(zip(zip(inter["user_id"], inter["item_id"]), inter["timestamp"]))
    for row in ex.itertuples():
        recent = list(row.recent_items)
        assert recent == _expected_recent(inter, row.user_id, row.timestamp, HISTORY)
        assert row.item_id not in recent
        assert all(when[(row.user_id, i)] < row.timestamp for i in recent)
    first = ex.sort_values("timestamp").groupby("user_id").head(1)
    assert all(len(r) == 0 for r in first["recent_items"])


def _expected_count(inter: pd.DataFrame, user, at: pd.Timestamp, days: int | None) -> int:
    """Brute force: the user's interactions in [at - days, at) (all before `at` when days is None)."""
    mine = inter[(inter["user_id"] == user) & (inter["timestamp"] < at)]
    if days is not None:
        mine = mine[mine["timestamp"] >= at - pd.Timedelta(days=days)]
    return len(mine)


def test_behaviour_counts_are_windows_strictly_before_each_example(run):
    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    ex = pd.read_parquet(run["training_dir"] / "examples.parquet")
    windows = {"interactions_total": None, "interactions_1d": 1, "interactions_7d": 7,
               "interactions_30d": 30}
    for row in ex.itertuples():
        for col, days in windows.items():
            assert getattr(row, col) == _expected_count(inter, row.user_id, row.timestamp, days), col
    # the windows are not degenerate on this data
    assert ex["interactions_7d"].between(1, ex["interactions_total"].max() - 1).any()
    assert (ex["interactions_30d"] <= ex["interactions_total"]).all()


def test_direct_feast_join_of_history_view_agrees(run):
    """The examples take lists by the row Feast picked in the index view; the list view agrees."""
    from features.store import open_store

    store = open_store(run["feast_dir"], run["features_dir"])
    ex = pd.read_parquet(run["training_dir"] / "examples.parquet")
    direct = point_in_time(store, ex, ["user_history_fv:recent_items", "user_history_fv:interactions_7d",
                                       "user_history_fv:interactions_total"])
    assert [list(x) for x in direct["recent_items"]] == [list(x) for x in ex["recent_items"]]
    for col in ["interactions_7d", "interactions_total"]:
        assert direct[col].tolist() == ex[col].tolist()


def _expected_popularity(inter: pd.DataFrame, item, at: pd.Timestamp, days: int) -> int:
    """Brute force: interactions with item on the `days` whole UTC days before at's day."""
    midnight = at.floor("D")
    mine = inter[(inter["item_id"] == item) & (inter["timestamp"] < midnight)
                 & (inter["timestamp"] >= midnight - pd.Timedelta(days=days))]
    return len(mine)


def test_item_popularity_as_of_any_time(run):
    """Feast's point-in-time join of item_popularity_fv gives whole-day counts before each time."""
    from features.store import open_store

    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    store = open_store(run["feast_dir"], run["features_dir"])
    rng = np.random.default_rng(0)
    lo, hi = inter["timestamp"].min(), inter["timestamp"].max() + pd.Timedelta(days=40)
    items = inter["item_id"].value_counts().index[:8].tolist()
    offsets = rng.uniform(0, (hi - lo).total_seconds(), 60)
    keys = pd.DataFrame({"item_id": rng.choice(np.array(items, dtype=object), 60).tolist(),
                         "timestamp": [(lo + pd.Timedelta(seconds=float(o))).floor("s") for o in offsets]})
    # exact midnights and the first instant of an item's life are the edge cases
    keys = pd.concat([keys, pd.DataFrame({"item_id": items[:2], "timestamp": [
        inter["timestamp"].max().ceil("D"), inter["timestamp"].min()]})], ignore_index=True)
    refs = [f"item_popularity_fv:item_popularity_{w}d" for w in (1, 7, 30)]
    got = point_in_time(store, keys, refs, key="item_id")
    for (item, at), row in zip(keys.itertuples(index=False), got.itertuples(index=False)):
        assert list(row) == [_expected_popularity(inter, item, at, w) for w in (1, 7, 30)], (item, at)
    assert got["item_popularity_30d"].max() > 0


def test_planted_item_popularity_rows_respect_time(run, tmp_path):
    """A popularity row dated after an example time is not seen; one dated before it is."""
    from features.store import open_store

    features, feast = tmp_path / "features", tmp_path / "feast"
    shutil.copytree(run["features_dir"], features)
    shutil.copytree(run["feast_dir"], feast)
    source = features / "item_popularity.parquet"
    rows = pq.read_table(source).to_pandas()
    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    item = inter["item_id"].iloc[0]
    at = inter["timestamp"].median().floor("s")
    planted = rows[rows["item_id"] == item].head(1).assign(item_popularity_7d=999_999,
                                                           event_timestamp=at)
    pq.write_table(pa.Table.from_pandas(pd.concat([rows, planted], ignore_index=True),
                                        schema=pq.read_schema(source), preserve_index=False), source)
    store = open_store(feast, features)
    keys = pd.DataFrame({"item_id": [item] * 3,
                         "timestamp": [at - pd.Timedelta(seconds=1), at, at + pd.Timedelta(hours=1)]})
    got = point_in_time(store, keys, ["item_popularity_fv:item_popularity_7d"], key="item_id")
    assert got["item_popularity_7d"].tolist()[0] == _expected_popularity(inter, item, keys["timestamp"][0], 7)
    assert got["item_popularity_7d"].tolist()[1:] == [999_999, 999_999]


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


def test_planted_feature_rows_respect_time(run, tmp_path):
    """A static row dated after an entity time is not seen; one dated before it is."""
    from features.store import open_store

    features, feast = tmp_path / "features", tmp_path / "feast"
    shutil.copytree(run["features_dir"], features)
    shutil.copytree(run["feast_dir"], feast)
    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    user = inter["user_id"].iloc[0]
    t_first, t_last = inter.loc[inter["user_id"] == user, "timestamp"].agg(["min", "max"])
    mid = (t_first + (t_last - t_first) / 2).floor("s")
    static = pq.read_table(features / "user_static.parquet").to_pandas()
    planted = static[static["user_id"] == user].assign(occupation="PLANTED", event_timestamp=mid)
    pq.write_table(pa.Table.from_pandas(pd.concat([static, planted], ignore_index=True),
                                        schema=pq.read_schema(features / "user_static.parquet"),
                                        preserve_index=False), features / "user_static.parquet")

    store = open_store(feast, features)
    keys = pd.DataFrame({"user_id": [user] * 4,
                         "timestamp": [t_first, mid - pd.Timedelta(seconds=1), mid, t_last]})
    got = point_in_time(store, keys, ["user_static_fv:occupation"])["occupation"].tolist()
    original = static.loc[static["user_id"] == user, "occupation"].iloc[0]
    assert got == [original, original, "PLANTED", "PLANTED"]


def test_online_store_serves_now(run):
    from features.online import online_user_features
    from features.store import open_store

    inter = pd.read_parquet(run["ingested"] / "interactions.parquet")
    users = pd.read_parquet(run["ingested"] / "users.parquet").set_index("user_id")
    store = open_store(run["feast_dir"], run["features_dir"])
    known = list(inter["user_id"].unique()[:3])
    lonely, missing = ("u9999", "u0404x") if run["string_ids"] else (9999, 404404)
    ids = [known[0], missing, lonely, *known, known[0]]
    got = online_user_features(store, run["schema"], ids)

    assert got.columns.tolist() == ["user_id", "age_bucket", "gender", "occupation", "age",
                                    "recent_items", "interactions_total", "interactions_1d",
                                    "interactions_7d", "interactions_30d", "seen_items", "known"]
    assert got["user_id"].tolist() == ids
    assert got["known"].tolist() == [True, False, True, True, True, True, True]
    forever = inter["timestamp"].max() + pd.Timedelta(days=1)
    for row in got[got["user_id"].isin(known)].itertuples():
        assert row.recent_items == _expected_recent(inter, row.user_id, forever, HISTORY)
        # counts as of the user's "now" row: windows end just after the last interaction
        now = inter.loc[inter["user_id"] == row.user_id, "timestamp"].max() + pd.Timedelta(seconds=1)
        assert row.interactions_total == _expected_count(inter, row.user_id, now, None)
        assert row.interactions_7d == _expected_count(inter, row.user_id, now, 7)
        assert sorted(row.seen_items) == sorted(inter.loc[inter["user_id"] == row.user_id, "item_id"])
        assert row.occupation == users.loc[row.user_id, "occupation"]
        assert row.age == users.loc[row.user_id, "age"]
    miss = got.iloc[1]
    assert miss["recent_items"] == [] and miss["seen_items"] == [] and pd.isna(miss["age"])
    assert miss["interactions_total"] == 0 and got.iloc[2]["interactions_30d"] == 0
    alone = got.iloc[2]
    assert alone["recent_items"] == [] and alone["seen_items"] == []
    assert alone["occupation"] == users.loc[lonely, "occupation"]
    # An id of the wrong type is an unknown user, not an exception.
    odd = online_user_features(store, run["schema"], ["not-an-int" if not run["string_ids"] else 7])
    assert odd["known"].tolist() == [False]
    assert online_user_features(store, run["schema"], []).empty


def test_registry_matches_the_id_types(run):
    from feast import ValueType

    from features.store import open_store

    assert (run["feast_dir"] / "registry.db").exists() and (run["feast_dir"] / "online.db").exists()
    store = open_store(run["feast_dir"], run["features_dir"])
    views = {v.name: v for v in store.list_feature_views()}
    assert set(views) == {"user_static_fv", "item_static_fv", "user_history_fv",
                          "user_history_index_fv", "user_seen_fv", "item_popularity_fv"}
    assert not views["user_history_index_fv"].online and views["user_history_fv"].online
    assert all(v.ttl in (None, pd.Timedelta(0)) for v in views.values())
    want = ValueType.STRING if run["string_ids"] else ValueType.INT64
    assert store.get_entity("user").value_type == want
    assert store.get_entity("item").value_type == want


def test_missing_and_bad_inputs_are_named(tmp_path):
    dirs = {"features_dir": tmp_path / "f", "feast_dir": tmp_path / "s", "training_dir": tmp_path / "t"}
    with pytest.raises(MissingStageInput, match="schema.json"):
        materialize(tmp_path / "nowhere", SPLIT, FeaturesParams(), **dirs)
    ing = make_contract_dataset(tmp_path / "ingested", n_users=5, n_items=10, per_user=(2, 4))
    inter = pd.read_parquet(ing / "interactions.parquet").assign(weight=1.0)
    inter.to_parquet(ing / "interactions.parquet", index=False)
    schema = _schema(False)
    schema["user_features"] = {"categorical": ["recent_items"], "numeric": [], "multi": []}
    (ing / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(DataContractError, match="recent_items.*reserved"):
        materialize(ing, SPLIT, FeaturesParams(), **dirs)
    schema["user_features"] = {"categorical": ["shoe_size"], "numeric": [], "multi": []}
    (ing / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(DataContractError, match="shoe_size"):
        materialize(ing, SPLIT, FeaturesParams(), **dirs)


def test_without_count_windows_only_the_total_is_built(tmp_path):
    ing = _ingested(tmp_path, False)
    dirs = {"features_dir": tmp_path / "features", "feast_dir": tmp_path / "feast",
            "training_dir": tmp_path / "training"}
    materialize(ing, SPLIT, FeaturesParams(history_length=HISTORY, count_windows_days=()), **dirs)
    ex = pd.read_parquet(dirs["training_dir"] / "examples.parquet")
    assert [c for c in ex.columns if c.startswith("interactions_")] == ["interactions_total"]
    from features.store import open_store
    views = {v.name for v in open_store(dirs["feast_dir"], dirs["features_dir"]).list_feature_views()}
    assert "item_popularity_fv" not in views and "user_history_fv" in views
