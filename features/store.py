"""Open the project's Feast FeatureStore from a programmatic RepoConfig (no feature_store.yaml).

The config lives in code so that the paths come from params.yaml (`paths.feast`, `paths.features`)
and a moved checkout still works: provider local, registry `<feast_dir>/registry.db`, file (Dask)
offline store whose sources sit in `features_dir`, and one of two online stores
(`features.online_store` in params.yaml):
- `sqlite`: `<feast_dir>/online.db`, nothing to run;
- `redis`: the Redis server at $REDIS_URL (default localhost:6379). The endpoint, and any password in
  it, comes from the environment, never from params.yaml or a file.

materialize records which kind it filled in `<feast_dir>/online_store.json`, so serving
(`towerflow recommend`) opens the same store without being told.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

from features.definitions import ITEM_KEY, PROJECT, USER_KEY
from features.errors import FeatureStoreConfigError

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


def open_store(feast_dir: Path, features_dir: Path, online: OnlineKind | None = None) -> "FeatureStore":
    """The FeatureStore over feast_dir (registry + online store); created on first use.

    online=None opens the kind recorded in feast_dir (what materialize filled).
    """
    from feast import FeatureStore, RepoConfig

    feast_dir = Path(feast_dir).resolve()
    feast_dir.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project=PROJECT,
        provider="local",
        registry=str(feast_dir / "registry.db"),
        online_store=_online_config(feast_dir, online or recorded_kind(feast_dir)),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
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
