"""The offline stores `features.offline_store` selects (file, duckdb, spark) give the same
point-in-time answers: on Feast's pitfalls (entity rows before any feature row, a TTL, several
entity rows with the same key and time, a row exactly at a feature time or at the TTL's edge, an
unknown key) against brute-force values, and on the project's own repo (training examples, item
catalog and the online rows materialization writes) against the file store."""
from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.definitions import PROJECT, SOURCE_FILES, batch_source
from features.history import write_sources
from features.online import online_user_features
from features.params import FeaturesParams
from features.refresh import fill_online
from features.store import open_store
from features.training_set import EXAMPLE_KEYS, example_keys, item_catalog, point_in_time, training_examples
from tests.features.feature_data import HISTORY, contract_schema, ingested_tables

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first

ENGINES = ["duckdb", "spark"]
TTL = timedelta(days=3)


def day(d: int, hour: int = 0) -> pd.Timestamp:
    return pd.Timestamp(2024, 1, d, hour, tz="UTC")


@pytest.fixture(scope="module", autouse=True)
def _stop_spark():
    """One Spark session serves the module (it starts a JVM); stop it after."""
    yield
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return
    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


# --- Feast's pitfalls on a one-view repo with a TTL ------------------------------------------------

FEATURE_ROWS = pd.DataFrame({          # out of time order on purpose
    "driver_id": [1, 2, 1, 4, 4],
    "event_timestamp": [day(15), day(10), day(5), day(2), day(8)],
    "rating": [20, 30, 10, 40, 41],
})
# (driver, time) -> expected rating (None: no row in force)
CASES = [
    (1, day(1), None),        # before the driver's first feature row: the file store drops it
    (1, day(5), 10),          # exactly at a feature row's time: that row is in force
    (1, day(7), 10),
    (1, day(7), 10),          # the same key and time twice (feast#6787 collapses these)
    (1, day(10), None),       # 5 days after the day-5 row, before the next one: expired (TTL 3 days)
    (1, day(17), 20),
    (2, day(12), 30),
    (2, day(13), 30),         # exactly at the TTL's edge: still in force
    (2, day(13, 1), None),    # an hour past the TTL: expired
    (4, day(9), 41),          # the newest of two rows before the time, not the first
    (4, day(3), 40),          # the older row, at a time before the newer one
    (3, day(10), None),       # a driver with no feature rows at all
]


def _pitfall_store(root, offline: str):
    from feast import Entity, FeatureView, Field, ValueType
    from feast.types import Int64

    features = root / offline / "features"
    features.mkdir(parents=True)
    path = features / "driver.parquet"
    pq.write_table(pa.Table.from_pandas(FEATURE_ROWS.astype({"event_timestamp": "datetime64[us, UTC]"}),
                                        preserve_index=False), path)
    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
    view = FeatureView(name="driver_fv", entities=[driver], ttl=TTL, online=True,
                       source=batch_source("driver_source", path, offline),
                       schema=[Field(name="rating", dtype=Int64)])
    store = open_store(root / offline / "feast", features, "sqlite", offline, "1g")
    assert store.config.project == PROJECT and store.config.offline_store.type == offline
    store.apply([driver, view])
    return store


def _case_keys() -> pd.DataFrame:
    keys = pd.DataFrame([(d, t) for d, t, _ in CASES], columns=["driver_id", "timestamp"])
    return keys.iloc[np.random.default_rng(0).permutation(len(keys))].reset_index(drop=True)


def _ratings(frame: pd.DataFrame) -> list:
    return [None if pd.isna(v) else int(v) for v in frame["rating"]]


@pytest.fixture(scope="module")
def pitfall_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("pitfalls")
    keys = _case_keys()
    got = point_in_time(_pitfall_store(root, "file"), keys, ["driver_fv:rating"], key="driver_id")
    return root, keys, got


def test_file_store_pitfalls_come_back_as_the_brute_force_values(pitfall_file):
    _, keys, got = pitfall_file
    expected = {(d, t): r for d, t, r in CASES}
    assert _ratings(got) == [expected[(d, t)] for d, t in zip(keys["driver_id"], keys["timestamp"])]


@pytest.mark.parametrize("offline", ENGINES)
def test_pitfalls_agree_with_the_file_store(pitfall_file, offline):
    root, keys, file_got = pitfall_file
    store = _pitfall_store(root, offline)
    got = point_in_time(store, keys, ["driver_fv:rating"], key="driver_id")
    assert _ratings(got) == _ratings(file_got)
    # materialization through this offline store writes the rows in force at the end (TTL applied
    # to the window start as Feast does), as through the file store
    end = day(16)
    file_store = open_store(root / "file" / "feast", root / "file" / "features", "sqlite", "file")
    for s in (file_store, store):
        s.materialize(start_date=(end - TTL).to_pydatetime(), end_date=end.to_pydatetime())
    rows = [{"driver_id": d} for d in (1, 2, 3, 4)]
    online = store.get_online_features(features=["driver_fv:rating"], entity_rows=rows).to_dict()
    assert online["rating"] == file_store.get_online_features(
        features=["driver_fv:rating"], entity_rows=rows).to_dict()["rating"] == [20, None, None, None]


def test_a_duckdb_join_prints_no_library_deprecation_warning(tmp_path):
    # ibis calls duckdb's deprecated fetch_arrow_table() in every join: the stage's log got two lines
    # of it per call, 28 on the 700k bench shape
    store = _pitfall_store(tmp_path, "duckdb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = point_in_time(store, _case_keys(), ["driver_fv:rating"], key="driver_id")
    assert len(got) == len(CASES)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], \
        [str(w.message) for w in caught]


# --- the project's repo ----------------------------------------------------------------------------

def _build(root, ing, schema: dict, offline: str) -> dict:
    inter = pd.read_parquet(ing / "interactions.parquet", columns=EXAMPLE_KEYS)
    users, items = pd.read_parquet(ing / "users.parquet"), pd.read_parquet(ing / "items.parquet")
    dirs = {"features_dir": root / offline / "features", "feast_dir": root / offline / "feast"}
    cfg = FeaturesParams(history_length=HISTORY, offline_store=offline)
    sources = write_sources(cfg, schema, users, items, inter, dirs["features_dir"])
    store, how = fill_online(cfg, schema, inter, sources, **dirs)
    assert how == "full" and store.config.offline_store.type == offline
    examples = example_keys(inter)
    examples["split"] = "train"
    table = training_examples(store, schema, examples, sources.history, dirs["features_dir"])
    catalog = item_catalog(store, schema, items, sources.now, dirs["features_dir"])
    # serving opens the store without naming an offline store (it only reads online rows)
    online = online_user_features(open_store(dirs["feast_dir"], dirs["features_dir"]), schema,
                                  users["user_id"].tolist())
    return {"examples": table, "catalog": catalog, "online": online}


# Spark runs on int ids only: each of its jobs costs seconds of JVM work even on tiny data.
@pytest.mark.parametrize("string_ids,engines", [(False, ENGINES), (True, ["duckdb"])],
                         ids=["int_ids", "string_ids"])
def test_training_join_catalog_and_online_rows_agree_with_the_file_store(tmp_path, string_ids, engines):
    ing = ingested_tables(tmp_path, string_ids)
    schema = contract_schema(string_ids)
    want = _build(tmp_path, ing, schema, "file")
    for offline in engines:
        got = _build(tmp_path, ing, schema, offline)
        assert got["examples"].schema == want["examples"].schema, offline
        assert got["examples"].equals(want["examples"]), offline
        assert got["catalog"].equals(want["catalog"]), offline
        pd.testing.assert_frame_equal(got["online"], want["online"])


def test_auto_picks_duckdb_above_the_measured_size():
    cfg = FeaturesParams(offline_auto_rows=1000)
    assert cfg.offline_for(1000) == "file" and cfg.offline_for(1001) == "duckdb"
    assert FeaturesParams(offline_store="spark").offline_for(10) == "spark"


def test_the_default_auto_is_duckdb_at_every_size_without_counting_the_join():
    """With the params a user gets: DuckDB was faster at every size measured (the demo's materialize
    10.2 s against the file store's 22.4 s), with the same training examples."""
    from flows.params import load_params

    def never() -> int:
        raise AssertionError("the join's pairs are counted only where the file store is possible")

    features = load_params(Path(__file__).resolve().parents[2] / "params.yaml").features
    assert [features.offline_for(n, never) for n in (1, 7_000, 100_000, 10_000_000)] == ["duckdb"] * 4


def test_auto_picks_duckdb_for_a_large_join_of_few_interactions():
    """The file store's join grows with each user's rows squared: a heavy user (the halfstar shape's
    20,871 events in 56k) makes hundreds of its calls. The pairs are counted over distinct (user, time)
    rows, as the join runs."""
    from features.training_set import join_pairs

    t = pd.Timestamp("2024-01-01", tz="UTC")
    rows = pd.DataFrame({"user_id": ["a"] * 3 + ["b"], "timestamp": [t, t, t + pd.Timedelta(1, "s"), t]})
    assert join_pairs(rows) == 2 ** 2 + 1
    heavy = pd.DataFrame({"user_id": ["bot"] * 8000, "timestamp": pd.date_range(t, periods=8000, freq="s")})
    cfg = FeaturesParams(offline_auto_rows=200_000)       # the file store kept for small data, as before
    assert cfg.offline_for(len(heavy), lambda: join_pairs(heavy)) == "duckdb"       # 64M pairs in 8,000 rows
    assert cfg.offline_for(len(heavy), lambda: join_pairs(heavy.iloc[:7000])) == "file"
    assert FeaturesParams(offline_store="file").offline_for(10, lambda: 10 ** 12) == "file"


def test_switching_the_offline_store_moves_the_sources_and_duckdb_extends_incrementally(tmp_path):
    """The registry's sources follow the offline store, so a switch must not reuse the old ones, and
    keeps the online rows (which store read the sources decides none of them); on DuckDB, newer
    interactions are materialized incrementally to the same online rows as a full build through the
    file store."""
    ing = ingested_tables(tmp_path, False)
    schema = contract_schema(False)
    inter = pd.read_parquet(ing / "interactions.parquet", columns=EXAMPLE_KEYS)
    users, items = pd.read_parquet(ing / "users.parquet"), pd.read_parquet(ing / "items.parquet")
    later = inter.sample(10, random_state=1).assign(
        timestamp=inter["timestamp"].max() + pd.to_timedelta(np.arange(1, 11), unit="h"))
    grown = pd.concat([inter, later], ignore_index=True)

    def fill(root, offline: str, rows: pd.DataFrame) -> tuple[str, pd.DataFrame]:
        dirs = {"features_dir": root / "features", "feast_dir": root / "feast"}
        cfg = FeaturesParams(history_length=HISTORY, offline_store=offline)
        sources = write_sources(cfg, schema, users, items, rows, dirs["features_dir"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            how = fill_online(cfg, schema, rows, sources, **dirs)[1]
        # ibis' deprecated duckdb call, once per materialized view, is not printed into the log
        assert not [w for w in caught if "fetch_arrow_table" in str(w.message)], [str(w.message) for w in caught]
        return how, online_user_features(open_store(dirs["feast_dir"], dirs["features_dir"]), schema,
                                         users["user_id"].tolist())

    def source_paths() -> set[str]:
        from feast import FileSource

        store = open_store(tmp_path / "feast", tmp_path / "features")
        return {source.path for source in store.list_data_sources() if isinstance(source, FileSource)}

    hows = [fill(tmp_path, o, inter)[0] for o in ("file", "file")]
    assert source_paths() == set(SOURCE_FILES.values())             # the file store's, relative
    hows += [fill(tmp_path, "duckdb", inter)[0]]
    assert source_paths() == {str((tmp_path / "features" / f).resolve()) for f in SOURCE_FILES.values()}
    hows += [fill(tmp_path, "duckdb", inter)[0]]
    assert hows == ["full", "unchanged", "unchanged", "unchanged"]
    how, incremental = fill(tmp_path, "duckdb", grown)
    assert how == "incremental"
    _, full = fill(tmp_path / "rebuilt", "file", grown)
    pd.testing.assert_frame_equal(incremental, full)


def test_duckdb_joins_under_the_configured_memory_limit(tmp_path):
    # at 10M interactions each join slice lifted the process by about this limit: the default keeps
    # the materialize stage under 8 GB (README "Scale"), so it must reach the DuckDB that Feast joins with
    import duckdb
    import ibis

    def shown(limit: str) -> str:      # DuckDB's own rendering of a limit, e.g. 3GB -> 2.7 GiB
        return duckdb.connect(config={"memory_limit": limit}).execute(
            "select current_setting('memory_limit')").fetchone()[0]

    default = FeaturesParams().duckdb_memory_limit
    for limit in (default, "1GB"):
        open_store(tmp_path / "feast", tmp_path / "features", "sqlite", "duckdb",
                   **({} if limit == default else {"duckdb_memory_limit": limit}))
        got = ibis.get_backend().raw_sql("select current_setting('memory_limit')").fetchone()[0]
        assert got == shown(limit) != shown("4GB"), limit
