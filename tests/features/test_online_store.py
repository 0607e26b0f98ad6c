"""The online store: Redis by one setting, training/serving skew, URL parsing.

Redis tests run a real `redis-server` on a free port in tmp_path (skipped, with the reason, only
when the binary is not installed; `.ci/run` installs it).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.errors import FeatureStoreConfigError
from features.params import FeaturesParams
from flows.stages.materialize import materialize
from models.params import SplitParams
from tests.features.feature_data import HISTORY, contract_schema, ingested_tables

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first

SPLIT = SplitParams(test_fraction=0.2, min_user_interactions=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run does)")
    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"redis-server did not answer on port {port}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _materialize(root: Path, ing: Path, online: str) -> dict:
    dirs = {"features_dir": root / "features", "feast_dir": root / "feast",
            "training_dir": root / "training"}
    materialize(SPLIT, FeaturesParams(history_length=HISTORY, online_store=online), ing, **dirs)
    return dirs


def _serving(dirs: dict, schema: dict, ids: list) -> pd.DataFrame:
    from features.online import online_user_features
    from features.store import open_store

    # No kind given: serving opens what materialize recorded, as `towerflow recommend` does.
    return online_user_features(open_store(dirs["feast_dir"], dirs["features_dir"]), schema, ids)


def _cells(column: pd.Series) -> list:
    """Comparable cells: arrays as lists, every kind of missing (None, NaN) as None."""
    return [list(v) if isinstance(v, (list, np.ndarray)) else None if pd.isna(v) else v
            for v in column]


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert a.columns.tolist() == b.columns.tolist()
    for col in a.columns:
        assert _cells(a[col]) == _cells(b[col]), col


@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
def test_redis_serves_what_sqlite_serves(tmp_path, redis_url, monkeypatch, string_ids):
    monkeypatch.setenv("REDIS_URL", redis_url)
    ing = ingested_tables(tmp_path, string_ids)
    schema = contract_schema(string_ids)
    lite = _materialize(tmp_path / "sqlite", ing, "sqlite")
    red = _materialize(tmp_path / "redis", ing, "redis")
    assert not (red["feast_dir"] / "online.db").exists()
    assert json.loads((red["feast_dir"] / "online_store.json").read_text()) == {"type": "redis"}

    inter = pd.read_parquet(ing / "interactions.parquet")
    missing = "nobody" if string_ids else 404404
    ids = [*inter["user_id"].unique()[:6], missing]
    got, want = _serving(red, schema, ids), _serving(lite, schema, ids)
    assert got["known"].tolist() == [True] * 6 + [False]
    _same(got, want)
    # Same offline sources and training examples either way: only the serving copy moved.
    assert pd.read_parquet(red["training_dir"] / "examples.parquet").equals(
        pd.read_parquet(lite["training_dir"] / "examples.parquet"))

    # A rebuild on fewer users must not serve the dropped users' stale Redis rows.
    kept = inter["user_id"].unique()[: len(ids) // 2]
    inter[inter["user_id"].isin(kept)].to_parquet(ing / "interactions.parquet", index=False)
    _materialize(tmp_path / "redis", ing, "redis")
    again = _serving(red, schema, ids)
    assert again["known"].tolist()[: len(kept)] == [True] * len(kept)
    dropped = again.iloc[len(kept):-1]
    # Dropped users keep their static row (users.parquet is unchanged) but no history.
    assert all(r == [] for r in dropped["recent_items"]) and all(s == [] for s in dropped["seen_items"])


def test_redis_down_is_a_named_store_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"127.0.0.1:{_free_port()}")
    ing = ingested_tables(tmp_path, False)
    with pytest.raises(FeatureStoreConfigError, match="no Redis answers at 127.0.0.1"):
        _materialize(tmp_path / "out", ing, "redis")


def test_redis_url_forms():
    from features.store import redis_connection_string as conn

    assert conn("localhost:6379") == "localhost:6379"
    assert conn("redis://cache:6380") == "cache:6380"
    assert conn("redis://:s%40cret@cache/2") == "cache:6379,db=2,password=s@cret"
    assert conn("rediss://bob:pw@cache:7000/0") == "cache:7000,db=0,password=pw,username=bob,ssl=true"
    with pytest.raises(FeatureStoreConfigError, match="REDIS_URL"):
        conn("http://cache:6379")


@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
def test_serving_features_equal_offline_features_now(tmp_path, string_ids):
    """Training/serving skew: the user tower inputs built from the online store equal those built
    from the offline store (point-in-time join) just after each user's last interaction."""
    from features.definitions import RECENT_ITEMS, user_history_refs, user_static_refs
    from features.store import open_store
    from features.training_set import point_in_time
    from flows.serving.recommend import NOT_TOWER_INPUTS
    from models.encoding import FeatureEncoder

    ing = ingested_tables(tmp_path, string_ids)
    schema = contract_schema(string_ids)
    dirs = _materialize(tmp_path, ing, "sqlite")
    inter = pd.read_parquet(ing / "interactions.parquet")
    users = inter["user_id"].drop_duplicates().sample(10, random_state=1).tolist()

    online = _serving(dirs, schema, users).drop(columns=list(NOT_TOWER_INPUTS))
    last = inter.groupby("user_id")["timestamp"].max()
    keys = pd.DataFrame({"user_id": users,
                         "timestamp": [last[u] + pd.Timedelta(seconds=2) for u in users]})
    store = open_store(dirs["feast_dir"], dirs["features_dir"])
    offline = point_in_time(store, keys, [*user_static_refs(schema), *user_history_refs(dirs["features_dir"])])
    offline.insert(0, "user_id", users)
    _same(online, offline)
    assert all(len(r) > 0 for r in online[RECENT_ITEMS])
    assert (online["interactions_total"] > 0).all() and "interactions_30d" in online.columns

    # And what the tower is fed from each: identical arrays (same encoder the train stage fits).
    examples = pd.read_parquet(dirs["training_dir"] / "examples.parquet")
    catalog = pd.read_parquet(dirs["training_dir"] / "items.parquet")
    encoder = FeatureEncoder.fit(schema, catalog, examples, history_length=HISTORY)
    served, built = encoder.encode_users(online), encoder.encode_users(offline)
    assert served.keys() == built.keys()
    for name in served:
        np.testing.assert_array_equal(served[name], built[name], err_msg=name)


def _all_users(ing: Path, extra: list) -> list:
    users = pd.read_parquet(ing / "users.parquet")["user_id"].tolist()
    return [*users, *extra]


def _item_popularity(dirs: dict, items: list) -> dict:
    from features.store import open_store

    store = open_store(dirs["feast_dir"], dirs["features_dir"])
    refs = [f"item_popularity_fv:item_popularity_{w}d" for w in (1, 7, 30)]
    return store.get_online_features(features=refs, entity_rows=[{"item_id": i} for i in items]).to_dict()


def test_rerun_materializes_incrementally_and_serves_what_a_rebuild_serves(tmp_path):
    ing = ingested_tables(tmp_path, False)
    schema = contract_schema(False)
    full = pd.read_parquet(ing / "interactions.parquet")
    cut = full["timestamp"].quantile(0.7)
    # The newer part arrives a day later, well after the first run's end.
    newer = full[full["timestamp"] >= cut].assign(timestamp=lambda d: d["timestamp"] + pd.Timedelta(days=1))
    older = full[full["timestamp"] < cut]
    older.to_parquet(ing / "interactions.parquet", index=False)
    work = tmp_path / "work"
    run = lambda: materialize(SPLIT, FeaturesParams(history_length=HISTORY), ing,  # noqa: E731
                              features_dir=work / "features", feast_dir=work / "feast",
                              training_dir=work / "training")["online_materialization"]
    dirs = {"features_dir": work / "features", "feast_dir": work / "feast", "training_dir": work / "training"}
    ids = _all_users(ing, [404404])

    assert run() == "full"
    assert run() == "unchanged"
    pd.concat([older, newer]).sample(frac=1.0, random_state=1).to_parquet(ing / "interactions.parquet",
                                                                          index=False)
    assert run() == "incremental"
    rebuilt = _materialize(tmp_path / "rebuilt", ing, "sqlite")
    _same(_serving(dirs, schema, ids), _serving(rebuilt, schema, ids))
    # item popularity too: the incrementally extended store serves what the rebuilt one serves
    popular = _item_popularity(dirs, full["item_id"].unique().tolist())
    assert popular == _item_popularity(rebuilt, full["item_id"].unique().tolist())
    assert any(v for v in popular["item_popularity_30d"])
    assert pd.read_parquet(dirs["training_dir"] / "examples.parquet").equals(
        pd.read_parquet(rebuilt["training_dir"] / "examples.parquet"))
    moved = newer["user_id"].iloc[0]
    got = _serving(dirs, schema, [moved])
    assert got["seen_items"].iloc[0] and set(newer.loc[newer["user_id"] == moved, "item_id"]) <= \
        set(got["seen_items"].iloc[0])

    # A late arrival (dated before the last end) rewrites older rows: rebuilt, and served.
    inter = pd.read_parquet(ing / "interactions.parquet")
    late = inter.iloc[[0]].assign(item_id=int(inter["item_id"].max()) + 1,
                                  timestamp=inter["timestamp"].min() + pd.Timedelta(hours=1))
    pd.concat([inter, late]).to_parquet(ing / "interactions.parquet", index=False)
    assert run() == "full"
    assert late["item_id"].iloc[0] in _serving(dirs, schema, [late["user_id"].iloc[0]])["seen_items"].iloc[0]

    # A changed user feature (dated as before) and a changed history length rebuild too.
    users = pd.read_parquet(ing / "users.parquet")
    users.loc[0, "occupation"] = "CHANGED"
    users.to_parquet(ing / "users.parquet", index=False)
    assert run() == "full"
    assert _serving(dirs, schema, [users["user_id"].iloc[0]])["occupation"].iloc[0] == "CHANGED"
    assert materialize(SPLIT, FeaturesParams(history_length=HISTORY + 1), ing,
                       **dirs)["online_materialization"] == "full"
    # A store that lost its online rows (or its state) is rebuilt, not extended.
    (dirs["feast_dir"] / "online.db").unlink()
    assert materialize(SPLIT, FeaturesParams(history_length=HISTORY + 1), ing,
                       **dirs)["online_materialization"] == "full"


def test_a_moved_checkout_or_another_offline_store_extends_the_online_rows_it_had(tmp_path):
    """Where the sources lie and which offline store reads them decide no online row: a copy of the
    project elsewhere (the original left in place, its files older) extends its store incrementally
    and then serves, and trains on, what a rebuild there gives; the default offline store (DuckDB,
    absolute source paths) and the file store take turns without a rebuild."""
    ing = ingested_tables(tmp_path, False)
    schema = contract_schema(False)
    full = pd.read_parquet(ing / "interactions.parquet")
    cut = full["timestamp"].quantile(0.7)
    older = full[full["timestamp"] < cut]
    newer = full[full["timestamp"] >= cut].assign(timestamp=lambda d: d["timestamp"] + pd.Timedelta(days=1))
    older.to_parquet(ing / "interactions.parquet", index=False)
    first, copy = tmp_path / "first", tmp_path / "copy"
    dirs = {"features_dir": copy / "features", "feast_dir": copy / "feast", "training_dir": copy / "training"}

    def run(root: Path, **features: object) -> str:
        return materialize(SPLIT, FeaturesParams(history_length=HISTORY, **features), ing,
                           features_dir=root / "features", feast_dir=root / "feast",
                           training_dir=root / "training")["online_materialization"]

    assert FeaturesParams().offline_for(len(older), lambda: 0) == "duckdb"   # the default a user gets
    assert run(first) == "full"
    shutil.copytree(first, copy)
    pd.concat([older, newer]).to_parquet(ing / "interactions.parquet", index=False)
    assert run(copy) == "incremental"
    rebuilt = _materialize(tmp_path / "rebuilt", ing, "sqlite")
    ids = _all_users(ing, [404404])
    _same(_serving(dirs, schema, ids), _serving(rebuilt, schema, ids))
    examples = pd.read_parquet(rebuilt["training_dir"] / "examples.parquet")
    assert pd.read_parquet(dirs["training_dir"] / "examples.parquet").equals(examples)
    for offline in ("file", "duckdb"):
        assert run(copy, offline_store=offline) == "unchanged"
        _same(_serving(dirs, schema, ids), _serving(rebuilt, schema, ids))
        assert pd.read_parquet(dirs["training_dir"] / "examples.parquet").equals(examples)


def _count_writes(monkeypatch) -> dict[str, list[int]]:
    """Rows per online write call, by view: a spy that passes every call on to Feast's SQLite store."""
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    calls: dict[str, list[int]] = {}
    write = SqliteOnlineStore.online_write_batch

    def counted(self, config, table, data, progress):  # noqa: ANN001, ANN202 (Feast's signature)
        calls.setdefault(table.name, []).append(len(data))
        return write(self, config, table, data, progress)

    monkeypatch.setattr(SqliteOnlineStore, "online_write_batch", counted)
    return calls


@pytest.mark.parametrize("offline", ["file", "duckdb"])
@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
def test_a_full_fill_writes_each_latest_row_once_and_serves_what_feasts_default_path_serves(
        tmp_path, monkeypatch, string_ids, offline):
    """A full fill is one materialize call in which the offline store picks each user's and item's
    latest row and Feast writes them features.online_write_rows at a time: every entity is written
    once (time windows wrote a user once per window: 3.95M history writes for 1M users at 10M
    interactions), and the store serves what Feast's default path (every row of the range read into
    pandas, deduplicated there, written in one batch) leaves."""
    import features.store
    from features.store import open_store

    ing = ingested_tables(tmp_path, string_ids)
    schema = contract_schema(string_ids)
    dirs = {name: tmp_path / "ours" / name for name in ("features", "feast", "training")}
    dirs = {f"{name}_dir": path for name, path in dirs.items()}
    writes = _count_writes(monkeypatch)
    out = materialize(SPLIT, FeaturesParams(history_length=HISTORY, offline_store=offline,
                                            online_write_rows=7), ing, **dirs)
    assert out["online_materialization"] == "full"
    config = open_store(dirs["feast_dir"], dirs["features_dir"]).config.materialization_config
    assert config.pull_latest_features and config.online_write_batch_size == FeaturesParams().online_write_rows
    history = open_store(dirs["feast_dir"], dirs["features_dir"]).get_feature_view("user_history_fv")
    assert len(history.materialization_intervals) == 1                     # one call
    inter = pd.read_parquet(ing / "interactions.parquet")
    assert sum(writes["user_history_fv"]) == sum(writes["user_seen_fv"]) == inter["user_id"].nunique()
    assert sum(writes["item_popularity_fv"]) == len(set(inter["item_id"]) | set(
        pd.read_parquet(ing / "items.parquet")["item_id"]))
    assert max(n for rows in writes.values() for n in rows) == 7 < out["users"]   # in batches

    # Feast's default path, in one batch, as the reference.
    monkeypatch.setattr(features.store, "_MATERIALIZATION", {"pull_latest_features": False})
    ref = {name: tmp_path / "ref" / path.name for name, path in dirs.items()}
    materialize(SPLIT, FeaturesParams(history_length=HISTORY, offline_store=offline,
                                      online_write_rows=10**9), ing, **ref)
    assert not open_store(ref["feast_dir"], ref["features_dir"]).config.materialization_config.pull_latest_features
    ids = _all_users(ing, [])
    _same(_serving(dirs, schema, ids), _serving(ref, schema, ids))
    items = inter["item_id"].unique().tolist()
    assert _item_popularity(dirs, items) == _item_popularity(ref, items)


def test_feature_bench_runs_on_a_store(tmp_path):
    from flows.experiments.features_bench import main

    ing = ingested_tables(tmp_path, True)
    dirs = _materialize(tmp_path, ing, "sqlite")
    (tmp_path / "schema.json").write_text(json.dumps(contract_schema(True)))
    out = tmp_path / "bench.json"
    main(["--feast-dir", str(dirs["feast_dir"]), "--features-dir", str(dirs["features_dir"]),
          "--schema", str(tmp_path / "schema.json"), "--repeats", "5", "--batch", "1000",
          "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["online_store"] == "sqlite" and got["materialize_seconds"] > 0
    assert got["online_batch_users"] == got["users_in_store"] == 25      # fewer than 1,000 exist
    assert got["online_1_user"]["n"] == 5 and got["online_batch"]["n"] == 5
    assert got["one_shot_reader_1_user"]["n"] == 5 and got["one_shot_reader_batch"]["n"] == 5
    assert 0 < got["online_1_user"]["p50_ms"] <= got["online_1_user"]["p99_ms"]
    # The store still serves every user afterwards (bench refilled it).
    users = pd.read_parquet(ing / "interactions.parquet")["user_id"].unique().tolist()
    assert _serving(dirs, contract_schema(True), users)["known"].all()


def test_response_columns_decode_like_feasts_to_dict() -> None:
    """The fast decoder gives what OnlineResponse.to_dict gives, for the kinds it decodes itself
    and for those it hands to Feast (timestamps, sets, an explicit null)."""
    from feast.online_response import OnlineResponse
    from feast.protos.feast.serving.ServingService_pb2 import GetOnlineFeaturesResponse
    from feast.protos.feast.types.Value_pb2 import Int64List, StringList, Value

    from features.online import response_columns

    columns = {
        "user_id": [Value(int64_val=1), Value(int64_val=2), Value(int64_val=3)],
        "age": [Value(string_val="18-24"), Value(), Value(string_val="")],
        "score": [Value(double_val=0.5), Value(float_val=1.25), Value(int32_val=-7)],
        "flag": [Value(bool_val=True), Value(bool_val=False), Value()],
        "recent_items": [Value(int64_list_val=Int64List(val=[5, 6])), Value(int64_list_val=Int64List()), Value()],
        "tags": [Value(string_list_val=StringList(val=["a"])), Value(null_val=0), Value(unix_timestamp_val=1700000000)],
    }
    proto = GetOnlineFeaturesResponse()
    proto.metadata.feature_names.val.extend(columns)
    for values in columns.values():
        proto.results.add().values.extend(values)
    response = OnlineResponse(proto)
    decoded = response_columns(response)
    assert decoded == response.to_dict()
    assert decoded["recent_items"] == [[5, 6], [], None] and decoded["age"] == ["18-24", None, ""]


def test_count_names_are_read_once_per_registry_and_again_after_an_apply(tmp_path, monkeypatch):
    """behaviour_counts builds a FeatureView from the registry once per store and registry state
    (it was half of a warm answer's CPU), and reads it again when the registry changes."""
    from features.definitions import build_repo
    from features.online import behaviour_counts
    from features.store import open_store

    ing = ingested_tables(tmp_path, False)
    schema = contract_schema(False)
    dirs = _materialize(tmp_path, ing, "sqlite")
    store = open_store(dirs["feast_dir"], dirs["features_dir"])
    assert behaviour_counts(store) == ["interactions_total", "interactions_1d", "interactions_7d", "interactions_30d"]
    reads = []
    real = store.get_feature_view
    monkeypatch.setattr(store, "get_feature_view", lambda *a, **k: reads.append(a) or real(*a, **k))
    for _ in range(3):
        behaviour_counts(store)
    assert reads == []                                         # answered from the memo

    # the same store object after a materialization with other windows is applied through it
    materialize(SPLIT, FeaturesParams(history_length=HISTORY, count_windows_days=(3,)), ing, **dirs)
    # the one-shot reader takes the names from the rows: the old windows' rows must be gone
    from features.online_sqlite import SqliteUserRows
    rows = SqliteUserRows.open(dirs["feast_dir"], dirs["features_dir"])
    assert rows.behaviour_counts() == ["interactions_total", "interactions_3d"]
    store.apply(build_repo(schema, dirs["features_dir"]).objects())
    assert behaviour_counts(store) == ["interactions_total", "interactions_3d"] and len(reads) == 1


TRIM_PROBE = """
import os, numpy as np
from features.memory import return_freed_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
blocks = [np.ones(8192) for _ in range(6000)]   # 64 KB each (375 MB), below malloc's mmap threshold
keep = blocks[::100]                            # a few survivors pin the heap: free() cannot shrink it
del blocks
before = rss()
return_freed_memory()
print(before, rss())
"""


def test_the_heap_a_full_fill_freed_goes_back_to_the_os(tmp_path, monkeypatch):
    """After Feast's pandas work glibc keeps the freed heap resident (5.33 GB after a 10M fill) and the
    training join stacks on it; a full fill hands it back, an unchanged store has nothing to hand."""
    import sys

    from features import refresh

    probe = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[2])
    before, after = map(float, probe.stdout.split())
    assert before - after > 250, probe.stdout              # MB handed back of the ~370 freed
    calls = []
    monkeypatch.setattr(refresh, "return_freed_memory", lambda: calls.append(1))
    ing = ingested_tables(tmp_path, False)
    assert _materialize(tmp_path / "work", ing, "sqlite") and len(calls) == 1
    assert _materialize(tmp_path / "work", ing, "sqlite") and len(calls) == 1   # unchanged: not again
