"""The Feast feature repository: entities, sources and feature views, built from the ingested schema.

The data contract allows any feature columns, so the views cannot be written out by hand: they are
built by `build_repo` from schema.json (which columns are features) and the parquet schemas of the
offline sources that materialize wrote (which Feast type each column has). Nothing runs at import.

The views, all without TTL (a TTL would drop examples whose newest feature row is older than it):
- `user_static_fv`: every user feature column, one row per user dated before all interactions.
- `item_static_fv`: every item feature column, one row per item, same early date.
- `user_history_fv`: `recent_items`, one row per (user, distinct interaction time) holding the items
  strictly before that time, plus a final row just after the user's last interaction ("now"); and
  the behaviour counts of the same interactions: `interactions_total` and `interactions_<w>d` for
  each window of `features.count_windows_days` (interactions in the w days before the row's time).
  Windows end at the row's time, the user's latest activity, so the values the tower sees at
  serving are exactly those of the "now" row (no skew with the wall clock of a later request).
- `item_popularity_fv`: `item_popularity_<w>d`, interactions with the item on the w whole UTC days
  before each row's midnight; a row wherever a value changes, plus a zero row at the start.
- `user_history_index_fv` (offline only): `history_row`, the same rows and timestamps as
  `user_history_fv`, holding each row's position in that view's source. The training join asks Feast
  for this scalar and takes the lists by position: the file (Dask) store pickles object columns to
  hash them on every persist, which made the list join take ~90 s on 100k interactions; the scalar
  join picks the very same rows in seconds (tests/features/test_feature_repo.py checks they agree).
- `user_seen_fv`: `seen_items`, every item the user interacted with, dated "now" (serving only).
`user_history_fv` and `user_seen_fv` read their files through push sources (`user_history_push`,
`user_seen_push`): materialize and the training join use the files as before, and the serving
service pushes a user's new "now" rows (features/online.py `event_rows`) straight into the online
store when an interaction arrives, so the next request sees it without a pipeline run.
Views without feature columns (a contract with no user or item features) are left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# the behaviour-count naming rule is the model's (its user tower log-scales these columns)
from models.encoding import INTERACTIONS_TOTAL, is_count_column

if TYPE_CHECKING:
    from feast import Entity, FeatureService, FeatureView

PROJECT = "towerflow"
TIMESTAMP_FIELD = "event_timestamp"
USER_KEY = "user_id"
ITEM_KEY = "item_id"
RECENT_ITEMS = "recent_items"
SEEN_ITEMS = "seen_items"
HISTORY_ROW = "history_row"

USER_STATIC_FV = "user_static_fv"
ITEM_STATIC_FV = "item_static_fv"
USER_HISTORY_FV = "user_history_fv"
USER_HISTORY_INDEX_FV = "user_history_index_fv"
USER_SEEN_FV = "user_seen_fv"
ITEM_POPULARITY_FV = "item_popularity_fv"
USER_SERVING_SERVICE = "two_tower_user_v1"
# Push sources of the views that real-time events update (one per view: each has its own file).
USER_HISTORY_PUSH = "user_history_push"
USER_SEEN_PUSH = "user_seen_push"

# Offline source file of each view, relative to paths.features.
SOURCE_FILES = {
    USER_STATIC_FV: "user_static.parquet",
    ITEM_STATIC_FV: "item_static.parquet",
    USER_HISTORY_FV: "user_history.parquet",
    USER_HISTORY_INDEX_FV: "user_history_index.parquet",
    USER_SEEN_FV: "user_seen.parquet",
    ITEM_POPULARITY_FV: "item_popularity.parquet",
}


@dataclass(frozen=True)
class FeatureRepo:
    user: "Entity"
    item: "Entity"
    user_static: "FeatureView | None"
    item_static: "FeatureView | None"
    user_history: "FeatureView"
    user_history_index: "FeatureView"
    user_seen: "FeatureView"
    item_popularity: "FeatureView | None"     # None without count windows
    user_serving: "FeatureService"

    def objects(self) -> list[Any]:
        """Everything `FeatureStore.apply` registers."""
        return [o for o in (self.user, self.item, self.user_static, self.item_static,
                            self.user_history, self.user_history_index, self.user_seen,
                            self.item_popularity, self.user_serving) if o is not None]


def feature_columns(schema: dict, side: str) -> list[str]:
    """Feature column names of 'user' or 'item' in schema.json order (categorical, numeric, multi)."""
    kinds = schema[f"{side}_features"]
    return [*kinds.get("categorical", []), *kinds.get("numeric", []), *kinds.get("multi", [])]


def user_count_columns(windows: "tuple[int, ...] | list[int]") -> list[str]:
    """Behaviour count columns of user_history_fv (numeric user tower inputs)."""
    return [INTERACTIONS_TOTAL, *(f"interactions_{w}d" for w in windows)]


def user_count_order(names: "list[str]") -> list[str]:
    """The count columns among `names` in user_count_columns' order (the windows are sorted:
    features/params.py): interactions_total, then the windows shortest first."""
    return sorted((n for n in names if is_count_column(n)), key=lambda n: count_window_days(n) or 0)


def count_window_days(name: str) -> int | None:
    """interactions_7d -> 7; interactions_total -> None (no window)."""
    return None if name == INTERACTIONS_TOTAL else int(name[len("interactions_"):-1])


def item_popularity_columns(windows: "tuple[int, ...] | list[int]") -> list[str]:
    return [f"item_popularity_{w}d" for w in windows]


# Names materialize adds to examples.parquet or Feast uses itself ("__row": the training join's
# row index): a feature column of the contract may not take them, nor a count or popularity name.
RESERVED = {USER_KEY, ITEM_KEY, "timestamp", "weight", "split", RECENT_ITEMS, SEEN_ITEMS,
            HISTORY_ROW, TIMESTAMP_FIELD, "__row", INTERACTIONS_TOTAL}


def is_reserved(column: str) -> bool:
    return column in RESERVED or is_count_column(column) or column.startswith("item_popularity_")


def source_features(path: Path, key: str) -> list[str]:
    """Feature columns of an offline source: all but the join key, the time and the row index."""
    import pyarrow.parquet as pq

    return [n for n in pq.read_schema(path).names if n not in (key, TIMESTAMP_FIELD, HISTORY_ROW)]


def user_history_refs(features_dir: Path) -> list[str]:
    """recent_items + the behaviour counts the history source holds."""
    names = source_features(features_dir / SOURCE_FILES[USER_HISTORY_FV], USER_KEY)
    return [f"{USER_HISTORY_FV}:{c}" for c in names]


def user_static_refs(schema: dict) -> list[str]:
    return [f"{USER_STATIC_FV}:{c}" for c in feature_columns(schema, "user")]


def item_static_refs(schema: dict) -> list[str]:
    return [f"{ITEM_STATIC_FV}:{c}" for c in feature_columns(schema, "item")]


def _feast_type(arrow_type: Any, where: str) -> Any:
    """Feast dtype for an arrow column type of an offline source (sources are written normalized)."""
    import pyarrow as pa
    from feast.types import Array, Bool, Float64, Int64, String

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner = arrow_type.value_type
        if pa.types.is_integer(inner):
            return Array(Int64)
        if pa.types.is_floating(inner):
            return Array(Float64)
        return Array(String)
    if pa.types.is_boolean(arrow_type):
        return Bool
    if pa.types.is_integer(arrow_type):
        return Int64
    if pa.types.is_floating(arrow_type):
        return Float64
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return String
    raise TypeError(f"{where}: column type {arrow_type} has no Feast feature type")


def batch_source(name: str, path: Path, offline: str) -> Any:
    """The view's parquet file as a source the offline store `offline` reads.

    The file store resolves a path relative to the store's repo_path (= features_dir, see
    features/store.py), which keeps the registry valid when the checkout moves. DuckDB (ibis
    `read_parquet`) and Spark read paths relative to the process's working directory, so they get
    the absolute path (a moved checkout changes the registry's digest: features/refresh.py then
    applies the views again and keeps the online rows). Spark's offline store only reads SparkSources.
    """
    from feast import FileSource

    if offline == "file":
        return FileSource(name=name, path=path.name, timestamp_field=TIMESTAMP_FIELD)
    if offline == "duckdb":
        return FileSource(name=name, path=str(path.resolve()), timestamp_field=TIMESTAMP_FIELD)
    if offline == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(name=name, path=str(path.resolve()), file_format="parquet",
                           timestamp_field=TIMESTAMP_FIELD)
    raise ValueError(f"unknown offline store {offline!r} (file | duckdb | spark)")


def _view(name: str, entity: "Entity", path: Path, columns: list[str], description: str,
          online: bool = True, push: str | None = None, offline: str = "file") -> "FeatureView":
    import pyarrow.parquet as pq
    from feast import FeatureView, Field, PushSource

    arrow_schema = pq.read_schema(path)
    fields = [Field(name=c, dtype=_feast_type(arrow_schema.field(c).type, f"{path}:{c}"))
              for c in columns]
    source = batch_source(f"{name.removesuffix('_fv')}_source", path, offline)
    if push is not None:
        # The file stays the batch source (materialize, historical joins); pushes go online only.
        source = PushSource(name=push, batch_source=source)
    # ttl=None is stored as 0 = "lives forever": the offline join then only requires the feature
    # row to be at or before the example time, and online reads never expire.
    return FeatureView(name=name, entities=[entity], ttl=None, source=source, schema=fields,
                       online=online, description=description)


def build_repo(schema: dict, features_dir: Path, offline: str = "file") -> FeatureRepo:
    """Entities, views and the serving FeatureService for the sources in features_dir, read by
    the offline store `offline` (file | duckdb | spark: features/store.py)."""
    from feast import Entity, FeatureService, ValueType

    def value_type(dtype: str) -> "ValueType":
        return ValueType.INT64 if dtype == "int64" else ValueType.STRING

    user = Entity(name="user", join_keys=[USER_KEY], value_type=value_type(schema["user_id_dtype"]))
    item = Entity(name="item", join_keys=[ITEM_KEY], value_type=value_type(schema["item_id_dtype"]))
    paths = {name: features_dir / f for name, f in SOURCE_FILES.items()}
    user_cols, item_cols = feature_columns(schema, "user"), feature_columns(schema, "item")
    user_static = _view(USER_STATIC_FV, user, paths[USER_STATIC_FV], user_cols,
                        "user features from users.parquet", offline=offline) if user_cols else None
    item_static = _view(ITEM_STATIC_FV, item, paths[ITEM_STATIC_FV], item_cols,
                        "item features from items.parquet", offline=offline) if item_cols else None
    user_history = _view(USER_HISTORY_FV, user, paths[USER_HISTORY_FV],
                         source_features(paths[USER_HISTORY_FV], USER_KEY),
                         "items strictly before each interaction time (newest first) and their counts",
                         push=USER_HISTORY_PUSH, offline=offline)
    history_index = _view(USER_HISTORY_INDEX_FV, user, paths[USER_HISTORY_INDEX_FV], [HISTORY_ROW],
                          f"row of {SOURCE_FILES[USER_HISTORY_FV]} in force at each time",
                          online=False, offline=offline)
    user_seen = _view(USER_SEEN_FV, user, paths[USER_SEEN_FV], [SEEN_ITEMS],
                      "every item the user interacted with (serving filter)", push=USER_SEEN_PUSH,
                      offline=offline)
    popularity_cols = source_features(paths[ITEM_POPULARITY_FV], ITEM_KEY)
    popularity = _view(ITEM_POPULARITY_FV, item, paths[ITEM_POPULARITY_FV], popularity_cols,
                       "interactions with the item over windows of whole days before each midnight",
                       offline=offline) if popularity_cols else None
    served = [v for v in (user_static, user_history, user_seen) if v is not None]
    serving = FeatureService(name=USER_SERVING_SERVICE, features=served)
    return FeatureRepo(user, item, user_static, item_static, user_history, history_index,
                       user_seen, popularity, serving)
