"""Full or incremental online materialization: what a rerun of materialize may keep.

The online store only ever gets rows dated in the materialized window. A rerun may extend that
window (Feast `materialize` from the end recorded in the state file) instead of rewriting
every row only when the rows already written are still right, i.e. everything dated before the
previous end is unchanged:
- the repo definition (views, fields, types, entities: the registry protos as built for the file
  store, whose sources name their files relative to features_dir), the history length, the online
  store kind and the Redis endpoint it wrote to (hashed: it may hold a password);
- the static sources (user/item features and their date, which follows the first interaction);
- every interaction dated before the previous end (a late arrival rewrites older history rows).
Then the new rows (new history rows, the moved "now" and seen rows of users with new interactions)
are all dated at or after the previous end. Anything else rebuilds the store from scratch.
Where the sources lie and which offline store reads them decide no online row: a checkout moved
elsewhere (DuckDB and Spark sources name absolute paths) or another `features.offline_store` only
applies the definitions to the registry again (its online tables kept) before extending the window
from the recorded end; the registry's sources must move, or the training join would read the old
folder's files where they still exist.
`<feast_dir>/materialized.json` holds the digests of the last successful materialization.
`fill_online` applies this: it plans, materializes and records.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.definitions import (
    ITEM_KEY,
    ITEM_STATIC_FV,
    SOURCE_FILES,
    USER_KEY,
    USER_STATIC_FV,
    build_repo,
)
from features.history import OfflineSources
from features.memory import return_freed_memory
from features.params import FeaturesParams, OfflineKind
from features.store import DEFAULT_REDIS, open_store, quiet_offline_reads, redis_connection_string, reset_online
from features.training_set import join_pairs

if TYPE_CHECKING:
    from feast import FeatureStore

STATE_FILE = "materialized.json"
STATE_VERSION = 2   # 2: the definition digest no longer holds the sources' paths
Refresh = Literal["full", "incremental", "unchanged"]


def _sha(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _table_digest(table: pa.Table) -> str:
    """Digest of an arrow table's schema and values (one chunk per column: chunking-independent)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return _sha(sink.getvalue().to_pybytes())


def interactions_digest(inter: pd.DataFrame, before: pd.Timestamp | None = None) -> str:
    """Digest of the (user, item, timestamp) rows dated before `before` (all when None), in a
    canonical order, so the file's row order does not matter."""
    rows = inter[[USER_KEY, ITEM_KEY, "timestamp"]]
    if before is not None:
        rows = rows[rows["timestamp"] < before]
    rows = rows.sort_values([USER_KEY, "timestamp", ITEM_KEY], kind="mergesort", ignore_index=True)
    hashed = pd.util.hash_pandas_object(rows, index=False).to_numpy()
    return _sha(str(rows.dtypes.to_dict()).encode(), hashed.tobytes())


def _without_meta(message):  # noqa: ANN001, ANN202 (a protobuf message)
    """The message with every nested `meta` (creation times, which differ per build) cleared."""
    from google.protobuf.message import Message

    for field, value in message.ListFields():
        if field.name == "meta":
            message.ClearField("meta")
        elif isinstance(value, Message):
            _without_meta(value)
        elif field.message_type is not None:      # repeated messages (a map yields its keys)
            for item in value:
                if isinstance(item, Message):
                    _without_meta(item)
    return message


def _specs(schema: dict, features_dir: Path, offline: OfflineKind) -> list[bytes]:
    return [_without_meta(o.to_proto().spec).SerializeToString(deterministic=True)
            for o in build_repo(schema, features_dir, offline).objects()]


def definition_digest(schema: dict, features_dir: Path, history_length: int, online: str) -> str:
    """Digest of everything that decides how a row is stored online (see module doc): the repo as
    built for the file store, whose relative source paths hold neither the checkout's place nor the
    offline store that reads them."""
    endpoint = redis_connection_string(os.environ.get("REDIS_URL") or DEFAULT_REDIS) \
        if online == "redis" else ""
    return _sha(*_specs(schema, features_dir, "file"),
                f"{STATE_VERSION}|{history_length}|{online}|{endpoint}".encode())


def registry_digest(schema: dict, features_dir: Path, offline: OfflineKind) -> str:
    """Digest of the registry's objects as the offline store `offline` reads them (its sources'
    kind and paths): when it changes and the definition does not, the objects are applied again."""
    return _sha(*_specs(schema, features_dir, offline))


def static_digest(features_dir: Path) -> str:
    return _sha(*(_table_digest(pq.read_table(features_dir / SOURCE_FILES[v])).encode()
                  for v in (USER_STATIC_FV, ITEM_STATIC_FV)))


class Plan(NamedTuple):
    how: Refresh
    previous: pd.Timestamp | None       # the recorded end, when not "full"
    reapply: bool                       # the registry's sources moved: apply the objects again


def plan(feast_dir: Path, online: str, definition: str, registry: str, static: str,
         inter: pd.DataFrame, end: pd.Timestamp) -> Plan:
    """How to bring the online store to `end` (see module doc)."""
    path = Path(feast_dir) / STATE_FILE
    if not path.is_file() or not (Path(feast_dir) / "registry.db").is_file():
        return Plan("full", None, False)
    if online == "sqlite" and not (Path(feast_dir) / "online.db").is_file():
        return Plan("full", None, False)
    state = json.loads(path.read_text())
    previous = pd.Timestamp(state.get("end", "1970-01-01T00:00:00Z"))
    if (state.get("definition") != definition or state.get("static") != static
            or end < previous or state.get("interactions") != interactions_digest(inter, previous)):
        return Plan("full", None, False)
    return Plan("unchanged" if end == previous else "incremental", previous, state.get("registry") != registry)


def record(feast_dir: Path, definition: str, registry: str, static: str, inter: pd.DataFrame,
           end: pd.Timestamp) -> None:
    """Write the state of a successful materialization up to `end` (every interaction is before)."""
    state = {"version": STATE_VERSION, "end": end.isoformat(), "definition": definition,
             "registry": registry, "static": static, "interactions": interactions_digest(inter, end)}
    (Path(feast_dir) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _open(features_cfg: FeaturesParams, features_dir: Path, feast_dir: Path,
          offline: OfflineKind) -> "FeatureStore":
    return open_store(feast_dir, features_dir, features_cfg.online_store, offline,
                      features_cfg.spark_driver_memory, features_cfg.duckdb_memory_limit,
                      features_cfg.online_write_rows)


def _fresh_store(features_cfg: FeaturesParams, schema: dict, features_dir: Path,
                 feast_dir: Path, offline: OfflineKind) -> "FeatureStore":
    """A new registry + online store: a stale view or row from an earlier run must not survive."""
    (feast_dir / "registry.db").unlink(missing_ok=True)
    reset_online(feast_dir, features_dir, features_cfg.online_store)
    store = _open(features_cfg, features_dir, feast_dir, offline)
    store.apply(build_repo(schema, features_dir, offline).objects())
    return store


def fill_online(features_cfg: FeaturesParams, schema: dict, interactions: pd.DataFrame,
                sources: OfflineSources, features_dir: Path,
                feast_dir: Path) -> tuple["FeatureStore", Refresh]:
    """Bring the registry + online store up to the sources' "now" rows: incrementally when the rows
    already online are still right, else rebuilt over the full range (see module doc). The store
    comes back opened on the offline store `features_cfg.offline_for` picks for the interactions and
    their training join's size, which also runs the training join."""
    end = sources.now + pd.Timedelta(seconds=1)  # the end is exclusive; the "now" rows must go online
    offline = features_cfg.offline_for(len(interactions), lambda: join_pairs(interactions))
    definition = definition_digest(schema, features_dir, features_cfg.history_length,
                                   features_cfg.online_store)
    registry = registry_digest(schema, features_dir, offline)
    static = static_digest(features_dir)
    how, previous, reapply = plan(feast_dir, features_cfg.online_store, definition, registry, static,
                                  interactions, end)
    # Forget the old state first: a run that dies mid-write must rebuild next time.
    (feast_dir / STATE_FILE).unlink(missing_ok=True)
    if how == "full":
        store = _fresh_store(features_cfg, schema, features_dir, feast_dir, offline)
        # One call: the offline store picks each entity's latest row, so each is written once.
        with quiet_offline_reads():
            store.materialize(start_date=sources.static_at.to_pydatetime(), end_date=end.to_pydatetime())
    else:
        store = _open(features_cfg, features_dir, feast_dir, offline)
        if reapply:
            # The same views over sources elsewhere: Feast keeps the online tables of views it
            # updates (partial apply); the views' materialized intervals go, hence the window below.
            store.apply(build_repo(schema, features_dir, offline).objects())
        if how == "incremental":
            # From the recorded end, which every view reached (not the registry's intervals).
            with quiet_offline_reads():
                store.materialize(start_date=previous.to_pydatetime(), end_date=end.to_pydatetime())
    record(feast_dir, definition, registry, static, interactions, end)
    if how != "unchanged":
        return_freed_memory()
    return store, how

