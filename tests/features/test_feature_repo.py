"""The Feast repo the features library builds (offline sources, registry, SQLite online store):
point-in-time joins, the training join's lists, online reads and entity types."""
from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.history import expand_lists, write_sources
from features.online import event_rows, online_user_features, push_event_rows
from features.online_sqlite import SqliteUserRows, value_module
from features.params import FeaturesParams
from features.refresh import fill_online
from features.store import open_store
from features.training_set import EXAMPLE_KEYS, example_keys, point_in_time, training_examples
from tests.features.feature_data import (
    HISTORY,
    contract_schema,
    expected_count,
    expected_recent,
    ingested_tables,
)


@pytest.fixture(scope="module", params=[False, True], ids=["int_ids", "string_ids"])
def repo(request, tmp_path_factory) -> dict:
    """The offline sources, registry and online store as materialize builds them, from the library
    calls alone, on the file offline store: the tests here open it as such (open_store's default)
    and plant rows in copies of its folders, which only the file store's relative source paths
    follow (DuckDB's and Spark's are absolute; tests/features/test_offline_stores.py compares the
    stores)."""
    root = tmp_path_factory.mktemp("string" if request.param else "int")
    ing = ingested_tables(root, request.param)
    schema = contract_schema(request.param)
    inter = pd.read_parquet(ing / "interactions.parquet", columns=EXAMPLE_KEYS)
    dirs = {"features_dir": root / "features", "feast_dir": root / "feast"}
    features_cfg = FeaturesParams(history_length=HISTORY, offline_store="file")
    sources = write_sources(features_cfg, schema, pd.read_parquet(ing / "users.parquet"),
                            pd.read_parquet(ing / "items.parquet"), inter, dirs["features_dir"])
    fill_online(features_cfg, schema, inter, sources, **dirs)
    return {"ingested": ing, "schema": schema, "string_ids": request.param, "sources": sources,
            "interactions": inter, **dirs}


def test_direct_feast_join_of_history_view_agrees(repo):
    """The examples take lists by the row Feast picked in the index view; the list view agrees."""
    store = open_store(repo["feast_dir"], repo["features_dir"])
    ex = training_examples(store, repo["schema"], example_keys(repo["interactions"]),
                           repo["sources"].history, repo["features_dir"]).to_pandas()
    assert len(ex) == len(repo["interactions"])
    direct = point_in_time(store, ex, ["user_history_fv:recent_items", "user_history_fv:interactions_7d",
                                       "user_history_fv:interactions_total"])
    assert [list(x) for x in direct["recent_items"]] == [list(x) for x in ex["recent_items"]]
    for col in ["interactions_7d", "interactions_total"]:
        assert direct[col].tolist() == ex[col].tolist()


def test_the_held_history_is_compact_and_the_examples_get_plain_lists(repo):
    """The join holds user_history_fv's rows with dictionary-coded lists (each id once, int32 codes:
    1.59 -> 0.61 GB at 10M string-id interactions); the source file and the examples keep plain lists."""
    held = repo["sources"].history
    written = pq.read_table(repo["features_dir"] / "user_history.parquet")
    assert pa.types.is_dictionary(held.schema.field("recent_items").type.value_type)
    assert held.column("recent_items").type.value_type.index_type == pa.int32()
    assert not pa.types.is_dictionary(written.schema.field("recent_items").type.value_type)
    assert expand_lists(held).equals(written)
    if repo["string_ids"]:
        assert held.column("recent_items").nbytes < 0.8 * written.column("recent_items").nbytes
    store = open_store(repo["feast_dir"], repo["features_dir"])
    ex = training_examples(store, repo["schema"], example_keys(repo["interactions"]).iloc[:50],
                           held, repo["features_dir"])
    assert ex.schema.field("recent_items").type == written.schema.field("recent_items").type


def test_the_held_history_gives_the_written_rows_by_slice_and_by_position(repo):
    """The join takes rows of the held history by position, slices and takes of slices: each gives
    the written file's rows, lists in order (newest first), empty lists (a user's first row) included."""
    held = repo["sources"].history
    written = pq.read_table(repo["features_dir"] / "user_history.parquet")
    assert [] in written.column("recent_items").to_pylist()
    for start, length in ((0, held.num_rows), (1, 5), (held.num_rows - 3, 3)):
        assert expand_lists(held.slice(start, length)).equals(written.slice(start, length))
    rows = pa.array([held.num_rows - 1, 0, 3, 3])
    assert expand_lists(held.take(rows)).equals(written.take(rows))
    assert expand_lists(held.slice(2).take(pa.array([1, 0]))).equals(written.slice(2).take(pa.array([1, 0])))


def _expected_popularity(inter: pd.DataFrame, item, at: pd.Timestamp, days: int) -> int:
    """Brute force: interactions with item on the `days` whole UTC days before at's day."""
    midnight = at.floor("D")
    mine = inter[(inter["item_id"] == item) & (inter["timestamp"] < midnight)
                 & (inter["timestamp"] >= midnight - pd.Timedelta(days=days))]
    return len(mine)


def test_item_popularity_as_of_any_time(repo):
    """Feast's point-in-time join of item_popularity_fv gives whole-day counts before each time."""
    inter = pd.read_parquet(repo["ingested"] / "interactions.parquet")
    store = open_store(repo["feast_dir"], repo["features_dir"])
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


def test_planted_item_popularity_rows_respect_time(repo, tmp_path):
    """A popularity row dated after an example time is not seen; one dated before it is."""
    features, feast = tmp_path / "features", tmp_path / "feast"
    shutil.copytree(repo["features_dir"], features)
    shutil.copytree(repo["feast_dir"], feast)
    source = features / "item_popularity.parquet"
    rows = pq.read_table(source).to_pandas()
    inter = pd.read_parquet(repo["ingested"] / "interactions.parquet")
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


def test_planted_feature_rows_respect_time(repo, tmp_path):
    """A static row dated after an entity time is not seen; one dated before it is."""
    features, feast = tmp_path / "features", tmp_path / "feast"
    shutil.copytree(repo["features_dir"], features)
    shutil.copytree(repo["feast_dir"], feast)
    inter = pd.read_parquet(repo["ingested"] / "interactions.parquet")
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


def test_online_store_serves_now(repo):
    inter = pd.read_parquet(repo["ingested"] / "interactions.parquet")
    users = pd.read_parquet(repo["ingested"] / "users.parquet").set_index("user_id")
    store = open_store(repo["feast_dir"], repo["features_dir"])
    known = list(inter["user_id"].unique()[:3])
    lonely, missing = ("u9999", "u0404x") if repo["string_ids"] else (9999, 404404)
    ids = [known[0], missing, lonely, *known, known[0]]
    got = online_user_features(store, repo["schema"], ids)

    assert got.columns.tolist() == ["user_id", "age_bucket", "gender", "occupation", "age",
                                    "recent_items", "interactions_total", "interactions_1d",
                                    "interactions_7d", "interactions_30d", "seen_items", "known"]
    assert got["user_id"].tolist() == ids
    assert got["known"].tolist() == [True, False, True, True, True, True, True]
    forever = inter["timestamp"].max() + pd.Timedelta(days=1)
    for row in got[got["user_id"].isin(known)].itertuples():
        assert row.recent_items == expected_recent(inter, row.user_id, forever, HISTORY)
        # counts as of the user's "now" row: windows end just after the last interaction
        now = inter.loc[inter["user_id"] == row.user_id, "timestamp"].max() + pd.Timedelta(seconds=1)
        assert row.interactions_total == expected_count(inter, row.user_id, now, None)
        assert row.interactions_7d == expected_count(inter, row.user_id, now, 7)
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
    odd = online_user_features(store, repo["schema"], ["not-an-int" if not repo["string_ids"] else 7])
    assert odd["known"].tolist() == [False]
    assert online_user_features(store, repo["schema"], []).empty


def _both_readers(feast_dir, features_dir, schema: dict, ids: list) -> tuple[pd.DataFrame, pd.DataFrame, SqliteUserRows]:
    reader = SqliteUserRows.open(feast_dir, features_dir)
    direct = online_user_features(reader, schema, ids)
    return direct, online_user_features(open_store(feast_dir, features_dir, offline=None), schema, ids), reader


def test_the_sqlite_reader_gives_feasts_rows_before_and_after_pushed_events(repo, tmp_path):
    """A one-shot answer reads the online rows with sqlite3 (no Feast import): the same frame as
    Feast's get_online_features, for known, unknown, featureless, wrong-type and repeated ids, and
    after events pushed through Feast (a known user's and a new user's rows)."""
    feast_dir = tmp_path / "feast"
    shutil.copytree(repo["feast_dir"], feast_dir)
    inter = repo["interactions"]
    known = list(inter["user_id"].unique()[:40])
    lonely, missing, new = ("u9999", "u0404x", "u5555") if repo["string_ids"] else (9999, 404404, 5555)
    odd = 7 if repo["string_ids"] else "not-an-int"
    ids = [known[0], missing, lonely, odd, *known, known[0], new]
    direct, feast, reader = _both_readers(feast_dir, repo["features_dir"], repo["schema"], ids)
    pd.testing.assert_frame_equal(direct, feast)
    assert reader._feast is None                # read without Feast, not through its fallback
    assert direct["known"].tolist() == [True, False, True, False, *[True] * len(known), True, False]
    assert direct.columns.tolist()[-6:-1] == ["interactions_total", "interactions_1d", "interactions_7d",
                                              "interactions_30d", "seen_items"]

    store = open_store(feast_dir, repo["features_dir"], offline=None)
    at = inter["timestamp"].max() + pd.Timedelta(hours=1)
    item = inter["item_id"].iloc[0]
    events = pd.DataFrame({"user_id": [known[0], new, new], "item_id": [item, item, inter["item_id"].iloc[1]],
                           "timestamp": [at, at, at + pd.Timedelta(minutes=1)]})
    push_event_rows(store, *event_rows(store, events, history_length=HISTORY))
    direct, feast, reader = _both_readers(feast_dir, repo["features_dir"], repo["schema"], ids)
    pd.testing.assert_frame_equal(direct, feast)
    assert reader._feast is None
    assert direct["known"].iloc[-1] and direct["interactions_total"].iloc[-1] == 2
    assert direct["recent_items"].iloc[0][0] == item


def test_a_value_the_sqlite_reader_does_not_decode_is_read_through_feast(repo, tmp_path):
    """A value of a kind beyond plain scalars and lists (here a timestamp written into a copy of the
    store) is not guessed at: the reader opens Feast, whose answer it gives, and keeps to it."""
    feast_dir = tmp_path / "feast"
    shutil.copytree(repo["feast_dir"], feast_dir)
    user = repo["interactions"]["user_id"].iloc[0]
    Value = value_module().Value
    with sqlite3.connect(feast_dir / "online.db") as conn:
        conn.execute("UPDATE towerflow_user_static_fv SET value = ? WHERE feature_name = 'occupation'",
                     [Value(unix_timestamp_val=1_700_000_000).SerializeToString()])
    direct, feast, reader = _both_readers(feast_dir, repo["features_dir"], repo["schema"], [user])
    assert reader._feast is not None and reader._through_feast     # and stays with Feast
    pd.testing.assert_frame_equal(direct, feast)
    assert direct["occupation"].iloc[0] is not None and not isinstance(direct["occupation"].iloc[0], int)


def test_the_sqlite_reader_serves_threads_and_follows_a_rebuilt_file(repo, tmp_path):
    """A service reads from several threads (each its own connection) and a rebuild replaces the file
    under the same name: the same reader then reads the new file, and lets go of the old one."""
    from concurrent.futures import ThreadPoolExecutor

    feast_dir = tmp_path / "feast"
    shutil.copytree(repo["feast_dir"], feast_dir)
    users = list(repo["interactions"]["user_id"].unique()[:30])
    reader = SqliteUserRows.open(feast_dir, repo["features_dir"])
    expected = online_user_features(open_store(feast_dir, repo["features_dir"], offline=None), repo["schema"], users)
    with ThreadPoolExecutor(4) as pool:
        frames = list(pool.map(lambda u: online_user_features(reader, repo["schema"], [u]), users * 3))
    pd.testing.assert_frame_equal(pd.concat(frames[:len(users)], ignore_index=True), expected)
    assert reader._feast is None and 1 <= len(reader._connections) <= 4
    before = online_user_features(reader, repo["schema"], users[:2])     # this thread's connection
    assert "REBUILT" not in before["occupation"].tolist()

    # a rebuild: a new file under the same name (here a copy with one user's occupation changed)
    Value = value_module().Value
    with sqlite3.connect(feast_dir / "online.db") as src, sqlite3.connect(feast_dir / "rebuilt.db") as dst:
        src.backup(dst)
        dst.execute("UPDATE towerflow_user_static_fv SET value = ? WHERE feature_name = 'occupation'",
                    [Value(string_val="REBUILT").SerializeToString()])
    os.replace(feast_dir / "rebuilt.db", feast_dir / "online.db")
    got = online_user_features(reader, repo["schema"], users[:2])
    assert got["occupation"].tolist() == ["REBUILT", "REBUILT"] and reader._feast is None
    old = [c for c in reader._connections]
    reader.close()
    assert reader._connections == [] and old


def test_no_sqlite_reader_without_a_sqlite_file(repo, tmp_path):
    assert SqliteUserRows.open(tmp_path / "never_materialized", repo["features_dir"]) is None
    assert SqliteUserRows.open(repo["feast_dir"], repo["features_dir"]) is not None


def test_registry_matches_the_id_types(repo):
    from feast import ValueType

    assert (repo["feast_dir"] / "registry.db").exists() and (repo["feast_dir"] / "online.db").exists()
    store = open_store(repo["feast_dir"], repo["features_dir"])
    views = {v.name: v for v in store.list_feature_views()}
    assert set(views) == {"user_static_fv", "item_static_fv", "user_history_fv",
                          "user_history_index_fv", "user_seen_fv", "item_popularity_fv"}
    assert not views["user_history_index_fv"].online and views["user_history_fv"].online
    assert all(v.ttl in (None, pd.Timedelta(0)) for v in views.values())
    want = ValueType.STRING if repo["string_ids"] else ValueType.INT64
    assert store.get_entity("user").value_type == want
    assert store.get_entity("item").value_type == want


def test_a_heavy_users_rows_split_across_chunks_give_the_same_join(repo):
    """The file store joins a user's every timestamp with every feature row of that user (~d^2 rows):
    one heavy user (17k events on the weekly shape) took 24 GB and was killed. Chunks now cut a user's
    rows apart, and the point-in-time answers are the same as in one piece."""
    from features.training_set import _chunks

    store = open_store(repo["feast_dir"], repo["features_dir"])
    keys = example_keys(repo["interactions"])
    refs = ["user_history_fv:interactions_total", "user_history_fv:interactions_7d"]
    whole = point_in_time(store, keys, refs)
    heaviest = keys["user_id"].value_counts().iloc[0]
    split = point_in_time(store, keys, refs, max_pairs=max(1, heaviest * 3))  # a few rows of it per chunk
    pd.testing.assert_frame_equal(whole, split)
    entity = pd.DataFrame({"user_id": [1] * 1000 + [2] * 10})
    chunks = _chunks(entity, "user_id", max_pairs=100_000)
    assert len(set(chunks[:1000])) == 10        # 1000 x 1000 pairs: cut in ten chunks of 100k


def test_an_online_only_store_reads_the_same_rows_without_importing_dask(repo):
    """Serving opens the store with offline=None: Feast's file offline store imports Dask when its
    config is validated (0.76 s of a one-shot recommend), and no online read needs it."""
    import json
    import subprocess
    import sys

    users = [str(u) for u in repo["interactions"]["user_id"].unique()[:4]]
    script = f"""
import json, sys
from pathlib import Path
from features.online import event_rows, online_user_features, push_event_rows
from features.online_sqlite import SqliteUserRows, value_module
from features.store import open_store
store = open_store(Path({str(repo["feast_dir"])!r}), Path({str(repo["features_dir"])!r}), offline=None)
ids = [{"str" if repo["string_ids"] else "int"}(u) for u in {users!r}]
got = online_user_features(store, json.loads({json.dumps(json.dumps(repo["schema"]))}), ids)
print(json.dumps({{"dask": any(m == "dask" or m.startswith("dask.") for m in sys.modules),
                   "rows": got.to_json(orient="records")}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                    cwd=str(__import__("pathlib").Path(__file__).parents[2])).stdout)
    assert out["dask"] is False
    store = open_store(repo["feast_dir"], repo["features_dir"])
    ids = [str(u) if repo["string_ids"] else int(u) for u in users]
    assert json.loads(out["rows"]) == json.loads(online_user_features(store, repo["schema"], ids).to_json(orient="records"))
