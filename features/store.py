"""Open the project's Feast FeatureStore from a programmatic RepoConfig (no feature_store.yaml).

The config lives in code so that the paths come from params.yaml (`paths.feast`, `paths.features`)
and a moved checkout still works: provider local, registry `<feast_dir>/registry.db`, an offline
store whose sources sit in `features_dir` (`features.offline_store`: file = pandas/Dask, duckdb =
ibis on DuckDB, spark = the contrib Spark store; the registry's sources are built for it by
features/definitions.py), and one of two online stores (`features.online_store` in params.yaml):
- `sqlite`: `<feast_dir>/online.db`, nothing to run;
- `redis`: the Redis server at $REDIS_URL (default localhost:6379). The endpoint, and any password in
  it, comes from the environment, never from params.yaml or a file.

materialize records which kind it filled in `<feast_dir>/online_store.json`, so serving
(`towerflow recommend`) opens the same store without being told.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

from features.definitions import ITEM_KEY, PROJECT, USER_KEY
from features.errors import FeatureStoreConfigError
from features.params import DUCKDB_MEMORY_LIMIT, ONLINE_WRITE_ROWS, OfflineKind
from models.import_hiding import import_hiding

if TYPE_CHECKING:
    from feast import FeatureStore

OnlineKind = Literal["sqlite", "redis"]
KIND_FILE = "online_store.json"
DEFAULT_REDIS = "localhost:6379"


def redis_connection_string(url: str) -> str:
    """Feast's `host:port[,db=N][,password=..][,ssl=true]` from a redis:// or rediss:// URL.

    A string without a scheme is taken as Feast's format already (host:port,param=value,...).
    """
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise FeatureStoreConfigError(
            f"REDIS_URL={url!r}: expected redis://[:password@]host[:port][/db] or host:port")
    out = [f"{parts.hostname}:{parts.port or 6379}"]
    db = parts.path.lstrip("/")
    if db:
        out.append(f"db={int(db)}")
    if parts.password:
        out.append(f"password={unquote(parts.password)}")
    if parts.username and parts.username != "default":
        out.append(f"username={unquote(parts.username)}")
    if parts.scheme == "rediss":
        out.append("ssl=true")
    return ",".join(out)


def recorded_kind(feast_dir: Path) -> OnlineKind:
    """The online store materialize filled in feast_dir (sqlite when it recorded none)."""
    path = Path(feast_dir) / KIND_FILE
    if not path.is_file():
        return "sqlite"
    kind = json.loads(path.read_text()).get("type")
    if kind not in ("sqlite", "redis"):
        raise FeatureStoreConfigError(f"{path}: unknown online store type {kind!r}")
    return kind


def _online_config(feast_dir: Path, kind: OnlineKind) -> dict:
    if kind == "redis":
        url = os.environ.get("REDIS_URL") or DEFAULT_REDIS
        return {"type": "redis", "connection_string": redis_connection_string(url)}
    return {"type": "sqlite", "path": str(feast_dir / "online.db")}


def _duckdb_backend(feast_dir: Path, memory_limit: str) -> None:
    """Point ibis's default backend (Feast's DuckDB store reads and joins through it) at a DuckDB
    connection with a memory limit that spills to feast_dir/duckdb-tmp. Process-wide, as ibis's
    default backend is; Feast's DuckDB store has no setting of its own for it."""
    import ibis

    spill = feast_dir / "duckdb-tmp"
    spill.mkdir(parents=True, exist_ok=True)
    ibis.set_backend(ibis.duckdb.connect(memory_limit=memory_limit, temp_directory=str(spill)))


def _offline_config(feast_dir: Path, kind: OfflineKind, spark_driver_memory: str) -> dict:
    if kind == "file":
        return {"type": "file"}
    if kind == "duckdb":
        missing = [m for m in ("duckdb", "ibis") if importlib.util.find_spec(m) is None]
        if missing:
            raise FeatureStoreConfigError(
                f"features.offline_store is duckdb but {', '.join(missing)} is not installed; "
                "pip install duckdb ibis-framework (requirements.lock pins both)")
        return {"type": "duckdb"}
    if kind == "spark":
        if importlib.util.find_spec("pyspark") is None:
            raise FeatureStoreConfigError("features.offline_store is spark but pyspark is not "
                                          "installed; pip install pyspark (requirements.lock pins it)")
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise FeatureStoreConfigError("features.offline_store is spark but no Java runtime is "
                                          "on PATH (nor JAVA_HOME); apt-get install default-jre-headless")
        return {"type": "spark", "spark_conf": {
            # local[*]: every task in this process's JVM; a cluster URL moves the join there (the
            # sources must then sit where its executors can read them).
            "spark.master": os.environ.get("SPARK_MASTER") or "local[*]",
            "spark.driver.memory": spark_driver_memory,
            # Feast writes and reads naive UTC timestamps: the session must not shift them to the
            # machine's zone.
            "spark.sql.session.timeZone": "UTC",
            # pandas <-> Spark through Arrow (the entity frame in, the joined rows out), not pickles.
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            # Spark's default of 200 shuffle partitions is for clusters: on one machine each is a
            # task of its own (the demo's join took 66 s with it). Spark's adaptive execution
            # still splits a skewed partition.
            "spark.sql.shuffle.partitions": str(2 * (os.cpu_count() or 1)),
            "spark.sql.warehouse.dir": str(feast_dir / "spark-warehouse"),
            "spark.local.dir": str(feast_dir / "spark-tmp"),
        }}
    raise FeatureStoreConfigError(f"unknown offline store {kind!r} (file | duckdb | spark)")


class OnlineOnly:
    """The offline store of a FeatureStore that only reads and pushes online rows (serving). Feast
    validates a configured offline store when the config is made, and its file store's validation
    imports Dask (0.76 s of a one-shot `towerflow recommend`'s 4.8 s on the 700k bench project); a
    non-dict offline store is taken as it is, and Feast builds the store from it only when a historical
    read or an offline write asks for one (and refuses: this is no OfflineStore class)."""

    type = "none: opened for online reads and pushes only"


@contextmanager
def quiet_offline_reads() -> Iterator[None]:
    """Reads through the offline store without one library warning nobody can act on: ibis' DuckDB
    backend calls duckdb's deprecated fetch_arrow_table() in every query, and Feast turns
    DeprecationWarnings on, so each join call and each view's materialization printed the same two
    lines into materialize's log (28 lines on the 700k bench shape: 9 join calls, 5 views)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"fetch_arrow_table\(\) is deprecated", DeprecationWarning)
        yield


def import_feast_without_torch() -> None:
    """Import Feast for a process that has no use for torch: a one-shot `towerflow recommend` (its
    user tower runs in numpy), the materialize stage, `towerflow events push`.

    feast.torch_wrapper imports torch at Feast's import, for tensor outputs that an online read never
    asks for: 1.1-1.5 s of a one-shot answer. Here torch is hidden while Feast is imported (Feast
    catches the ImportError and reports torch missing only if a tensor is asked for); torch stays
    importable afterwards. Does nothing when Feast or torch is already imported (a long-running
    process keeps Feast as it is). (Typeguard's instrumentation of Feast is left off by every
    `towerflow` command: flows/environment.py.)"""
    import_hiding("feast", ("torch",))


def _answer_versioned_read_probe(kind: OnlineKind) -> None:
    """Give Feast's online store class the answer to its "are versioned reads supported" probe.

    On its first online read Feast imports the modules of six other online stores (Redis, MySQL,
    Postgres, Faiss, DynamoDB, Milvus) only to test `isinstance(store, (SqliteOnlineStore, ...))`,
    and caches the answer on the store: 70 ms of a one-shot `towerflow recommend`'s ~2 s, most of
    it importing the Redis client a SQLite store never uses. SQLite and Redis are both on Feast's
    list, so the answer is True; set where Feast caches it, before any read. (No read of ours asks
    for a feature view version, which is all the answer decides.)"""
    if kind == "sqlite":
        from feast.infra.online_stores.sqlite import SqliteOnlineStore as store_class
    else:
        from feast.infra.online_stores.redis import RedisOnlineStore as store_class
    if getattr(store_class, "_versioned_read_supported", False) is None:
        store_class._versioned_read_supported = True


# Feast's default materialization pulls every row of the range into pandas and keeps each entity's
# latest there (11.8 GB high-water for 10M interactions' 11M history rows), and writes them in one
# batch. With pull_latest_features the offline store (DuckDB, Spark, Dask) picks the latest rows
# itself: a full fill over 10M interactions took one call, 217 s and a 2.65 GB lift, where calls per
# 2M-row time window (which rewrote a user once per window: 3.95M history writes for 1M users) took 786 s.
_MATERIALIZATION = {"pull_latest_features": True}


def open_store(feast_dir: Path, features_dir: Path, online: OnlineKind | None = None,
               offline: OfflineKind | None = "file", spark_driver_memory: str = "4g",
               duckdb_memory_limit: str = DUCKDB_MEMORY_LIMIT,
               online_write_rows: int = ONLINE_WRITE_ROWS) -> "FeatureStore":
    """The FeatureStore over feast_dir (registry + online store); created on first use.

    online=None opens the kind recorded in feast_dir (what materialize filled). `offline` must be
    the kind the registry was built for (features/refresh.py); None: online reads and pushes only
    (serving), no offline store (OnlineOnly). Materialize asks the offline store for each entity's
    latest row only and writes them online_write_rows at a time (see `_MATERIALIZATION`).
    """
    from feast import FeatureStore, RepoConfig

    feast_dir = Path(feast_dir).resolve()
    feast_dir.mkdir(parents=True, exist_ok=True)
    kind = online or recorded_kind(feast_dir)
    _answer_versioned_read_probe(kind)
    offline_config = OnlineOnly() if offline is None else _offline_config(feast_dir, offline, spark_driver_memory)
    if offline == "duckdb":
        _duckdb_backend(feast_dir, duckdb_memory_limit)
    config = RepoConfig(
        project=PROJECT,
        provider="local",
        registry=str(feast_dir / "registry.db"),
        online_store=_online_config(feast_dir, kind),
        offline_store=offline_config,
        entity_key_serialization_version=3,
        materialization={**_MATERIALIZATION, "online_write_batch_size": online_write_rows},
        # FileSource paths are relative to repo_path (features/definitions.py), so the registry
        # holds no absolute paths.
        repo_path=Path(features_dir).resolve(),
    )
    return FeatureStore(config=config)


def reset_online(feast_dir: Path, features_dir: Path, online: OnlineKind) -> None:
    """Drop every online row of this project and record `online` as feast_dir's store.

    A rebuilt repo must not serve a stale row from an earlier run: the SQLite file is deleted; in
    Redis every key of the project's user and item entities is deleted (keys end with the project).
    """
    feast_dir = Path(feast_dir)
    feast_dir.mkdir(parents=True, exist_ok=True)
    (feast_dir / "online.db").unlink(missing_ok=True)
    if online == "redis":
        from feast.infra.online_stores.redis import RedisOnlineStore

        from redis.exceptions import ConnectionError as RedisConnectionError

        store = open_store(feast_dir, features_dir, online)
        redis = RedisOnlineStore()
        try:
            for key in (USER_KEY, ITEM_KEY):
                redis.delete_entity_values(store.config, [key])
        except RedisConnectionError as exc:
            # The URL may hold a password: name the host only.
            host = store.config.online_store.connection_string.split(",")[0]
            raise FeatureStoreConfigError(
                f"features.online_store is redis but no Redis answers at {host} ({exc}); "
                "start redis-server or set REDIS_URL") from None
    (feast_dir / KIND_FILE).write_text(json.dumps({"type": online}) + "\n")
