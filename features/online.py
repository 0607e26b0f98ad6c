"""Serving-time user features from the Feast online store (the views the training examples used),
and the rows that real-time interactions push into it (`event_rows`, `push_event_rows`)."""
from __future__ import annotations

import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd

from features.definitions import (
    RECENT_ITEMS,
    SEEN_ITEMS,
    TIMESTAMP_FIELD,
    USER_HISTORY_FV,
    USER_HISTORY_PUSH,
    USER_KEY,
    USER_SEEN_FV,
    USER_SEEN_PUSH,
    count_window_days,
    feature_columns,
    is_count_column,
    user_static_refs,
)
from features.history import NOW_OFFSET

if TYPE_CHECKING:
    from feast import FeatureStore

    from features.online_sqlite import SqliteUserRows


def _coerce(user_id: Any, dtype: str) -> Any:
    """The id as the entity's value type, or None when it cannot be one (then it is unknown)."""
    if dtype != "int64":
        return str(user_id)
    try:
        as_int = int(user_id)
    except (TypeError, ValueError):
        return None
    # 3.5 or "7.0" are not ids of an int64 store.
    return as_int if str(as_int) == str(user_id).strip() or as_int == user_id else None


# Value kinds whose Python value is the proto field itself (scalars) or its items (lists): decoded
# here, at half the cost of Feast's general converter, which still decodes every other kind.
PLAIN_KINDS = frozenset({"int32_val", "int64_val", "float_val", "double_val", "string_val", "bool_val", "bytes_val"})
PLAIN_LIST_KINDS = frozenset(k.replace("_val", "_list_val") for k in PLAIN_KINDS)
NOT_PLAIN = object()


def plain_value(value: Any) -> Any:
    """The Python value of a Feast Value proto of a plain kind as Feast's converter gives it (None:
    no value), or NOT_PLAIN for any other kind."""
    kind = value.WhichOneof("val")
    if kind is None:
        return None
    if kind in PLAIN_KINDS:
        return getattr(value, kind)
    if kind in PLAIN_LIST_KINDS:
        return list(getattr(value, kind).val)
    return NOT_PLAIN


def response_columns(response: Any) -> dict[str, list]:
    """`OnlineResponse.to_dict()`: feature name -> one Python value per entity row (None: no value)."""
    from feast.type_map import feast_value_type_to_python_type

    columns: dict[str, list] = {}
    for name, result in zip(response.proto.metadata.feature_names.val, response.proto.results):
        column = [plain_value(value) for value in result.values]
        columns[name] = [feast_value_type_to_python_type(value) if got is NOT_PLAIN else got
                         for got, value in zip(column, result.values)]
    return columns


# store -> (the registry it was read from, the count names). Feast builds a FeatureView from the
# registry proto on every get_feature_view, through typeguard-checked constructors: about half of
# a warm one-user answer's CPU (2.5 of 5 ms here). Weak keys: a closed store takes its entry along.
_COUNTS: "weakref.WeakKeyDictionary[Any, tuple[tuple[int, bytes], list[str]]]" = weakref.WeakKeyDictionary()


def behaviour_counts(store: "FeatureStore") -> list[str]:
    """The count features of the registered user_history_fv (their windows are a materialize param).
    Read again whenever the store's cached registry is another one or was updated since (an apply)."""
    proto = getattr(getattr(store, "registry", None), "cached_registry_proto", None)
    stamp = (id(proto), proto.last_updated.SerializeToString()) if proto is not None else None
    cached = _COUNTS.get(store)
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[1]
    # the cached registry (as get_online_features reads it): a fresh read costs ~4 ms per request
    view = store.get_feature_view(USER_HISTORY_FV, allow_registry_cache=True)
    names = [f.name for f in view.features if is_count_column(f.name)]
    if stamp is not None:
        try:
            _COUNTS[store] = (stamp, names)
        except TypeError:     # a store object that cannot be weakly referenced: no memo
            pass
    return names


def _user_rows(store: "FeatureStore | SqliteUserRows", schema: dict, lookup: list
               ) -> tuple[list[str], dict[str, list], list[bool]]:
    """(the behaviour count names, feature name -> one value per looked-up key, whether each key is
    a known user), read by the SQLite reader when it can, else by Feast."""
    from features.online_sqlite import NotReadableHere, SqliteUserRows

    if isinstance(store, SqliteUserRows):
        try:
            counts = store.behaviour_counts()
            return counts, *store.read(user_feature_refs(schema, counts), lookup)
        except NotReadableHere:
            store = store.feast()
    counts = behaviour_counts(store)
    if not lookup:
        return counts, {}, []
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    response = store.get_online_features(features=user_feature_refs(schema, counts),
                                         entity_rows=[{USER_KEY: k} for k in lookup])
    values = response_columns(response)
    names = list(response.proto.metadata.feature_names.val)
    # A user is known when any of its views has a value; the key column is always PRESENT.
    # Redis marks a missing key PRESENT with a null value (SQLite: NOT_FOUND), so both count.
    present = [any(r.statuses[i] == FieldStatus.PRESENT and values[name][i] is not None
                   for name, r in zip(names, response.proto.results) if name != USER_KEY)
               for i in range(len(lookup))]
    return counts, values, present


def user_feature_refs(schema: dict, counts: list[str]) -> list[str]:
    """The feature references of a user's serving row: static features, then `history_refs`."""
    return [*user_static_refs(schema), *history_refs(counts)]


def history_refs(counts: list[str]) -> list[str]:
    """The references of the rows interactions change: recent items, the counts, seen items."""
    return [f"{USER_HISTORY_FV}:{RECENT_ITEMS}", *(f"{USER_HISTORY_FV}:{c}" for c in counts),
            f"{USER_SEEN_FV}:{SEEN_ITEMS}"]


def online_user_features(store: "FeatureStore | SqliteUserRows", schema: dict, user_ids: list) -> pd.DataFrame:
    """One row per requested id, in order: user_id, user features, recent_items, the behaviour
    counts, seen_items, known.

    Unknown users (never materialized, or an id of the wrong type) get known=False, null features,
    empty lists and zero counts, never an exception: serving falls back to a cold-start query for
    them. A known user without interactions has zero counts too (as offline: nothing before).
    `store` is Feast's, or serving's reader of its SQLite file (features/online_sqlite.py: the same
    rows without Feast).
    """
    columns = feature_columns(schema, "user")
    keys = [_coerce(u, schema["user_id_dtype"]) for u in user_ids]
    lookup = list(dict.fromkeys(k for k in keys if k is not None))
    counts, values, present = _user_rows(store, schema, lookup)
    found: dict[Any, dict[str, Any]] = {}
    for i, key in enumerate(lookup):
        found[key] = {c: values[c][i] for c in [*columns, RECENT_ITEMS, *counts, SEEN_ITEMS]}
        found[key]["known"] = present[i]
    rows = []
    for raw, key in zip(user_ids, keys):
        hit = found.get(key, {}) if key is not None else {}
        known = bool(hit.get("known", False))
        rows.append({
            USER_KEY: key if key is not None else raw,
            **{c: hit.get(c) if known else None for c in columns},
            RECENT_ITEMS: list(hit.get(RECENT_ITEMS) or []) if known else [],
            **{c: int(hit.get(c) or 0) if known else 0 for c in counts},
            SEEN_ITEMS: list(hit.get(SEEN_ITEMS) or []) if known else [],
            "known": known,
        })
    return pd.DataFrame(rows, columns=[USER_KEY, *columns, RECENT_ITEMS, *counts, SEEN_ITEMS, "known"])


def _current_rows(store: "FeatureStore", keys: list, counts: list[str]) -> dict[Any, dict[str, Any]]:
    """Each user's online history + seen row, with the history row's time (None: no row yet)."""
    response = store.get_online_features(features=history_refs(counts), entity_rows=[{USER_KEY: k} for k in keys])
    values = response_columns(response)
    names = list(response.proto.metadata.feature_names.val)
    stamps = response.proto.results[names.index(RECENT_ITEMS)].event_timestamps
    out = {}
    for i, key in enumerate(keys):
        has_row = values[RECENT_ITEMS][i] is not None or values[SEEN_ITEMS][i] is not None
        stamp = pd.Timestamp(stamps[i].ToDatetime(), tz="UTC") if has_row and stamps[i].seconds else None
        out[key] = {"recent": list(values[RECENT_ITEMS][i] or []), "seen": list(values[SEEN_ITEMS][i] or []),
                    "counts": {c: int(values[c][i] or 0) for c in counts}, "at": stamp}
    return out


def event_rows(store: "FeatureStore", events: pd.DataFrame, history_length: int
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The new "now" rows of user_history_fv and user_seen_fv after these interactions (user_id,
    item_id, timestamp as UTC datetimes; ids already of the entity's type), one per user, built on
    the user's current online row the way features/history.py builds them offline:
    - recent_items: the new items in front (newest first), cut to history_length;
    - seen_items: distinct items, newest first;
    - interactions_total + 1 per event; interactions_<w>d + 1, or 1 when the user's previous
      interaction is at least w days older (everything before left the window). The online row
      keeps no timestamps per item, so an older interaction leaving the window in between is only
      dropped by the next pipeline run: until then that count is an upper bound.
    - dated `timestamp + 1 s` like the offline "now" row, and always after the current row: a
      late event (older than the user's latest) still wins over the row it extends.
    """
    counts = behaviour_counts(store)
    ordered = events.sort_values([USER_KEY, "timestamp", "item_id"], kind="mergesort")
    current = _current_rows(store, list(dict.fromkeys(ordered[USER_KEY].tolist())), counts)
    return _extend(current, ordered, counts, history_length)


def replay_rows(store: "FeatureStore", events: pd.DataFrame, offline: pd.DataFrame, history_length: int,
                windows: tuple[int, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`event_rows` built on each user's offline "now" row (from `offline`: the materialized
    interactions of these users) instead of the online one, so replaying the same events again gives
    the same rows (exactly once, whatever was pushed in between); dated after the online rows too."""
    from features.history import history_rows, seen_rows

    counts = behaviour_counts(store)
    ordered = events.sort_values([USER_KEY, "timestamp", "item_id"], kind="mergesort")
    keys = list(dict.fromkeys(ordered[USER_KEY].tolist()))
    online = _current_rows(store, keys, counts)
    base = {k: {"recent": [], "seen": [], "counts": {c: 0 for c in counts}, "at": None} for k in keys}
    mine = offline[offline[USER_KEY].isin(keys)]
    if len(mine):
        hist = history_rows(mine, history_length, windows).to_pandas()
        now = hist.sort_values(TIMESTAMP_FIELD, kind="mergesort").groupby(USER_KEY, sort=False).tail(1)
        seen = seen_rows(mine).to_pandas().set_index(USER_KEY)[SEEN_ITEMS]
        for row in now.to_dict("records"):
            base[row[USER_KEY]] = {"recent": list(row[RECENT_ITEMS]), "seen": list(seen[row[USER_KEY]]),
                                   "counts": {c: int(row.get(c) or 0) for c in counts},
                                   "at": pd.Timestamp(row[TIMESTAMP_FIELD]).tz_convert("UTC")}
    history, seen_out = _extend(base, ordered, counts, history_length)
    latest = [online[k]["at"] for k in history[USER_KEY]]
    stamps = [max(at, prev + timedelta(microseconds=1)) if prev is not None else at
              for at, prev in zip(history[TIMESTAMP_FIELD], latest)]
    history[TIMESTAMP_FIELD] = seen_out[TIMESTAMP_FIELD] = stamps
    return history, seen_out


def _extend(current: dict[Any, dict[str, Any]], ordered: pd.DataFrame, counts: list[str], history_length: int
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's row (`current`: recent, seen, counts, at) after their events (see event_rows)."""
    history, seen = [], []
    for key, group in ordered.groupby(USER_KEY, sort=False):
        row = current[key]
        recent, seen_items, totals, at = row["recent"], row["seen"], dict(row["counts"]), row["at"]
        for item, ts in zip(group["item_id"].tolist(), group["timestamp"].tolist()):
            ts = pd.Timestamp(ts).tz_convert("UTC")
            last = at - NOW_OFFSET if at is not None else None
            for name in counts:
                days = count_window_days(name)
                gone = days is not None and last is not None and ts - last >= timedelta(days=days)
                totals[name] = 1 if gone or last is None else totals[name] + 1
            recent = [item, *recent][:history_length]
            seen_items = [item, *(s for s in seen_items if s != item)]
            at = max(ts + NOW_OFFSET, at + timedelta(microseconds=1)) if at is not None else ts + NOW_OFFSET
        history.append({USER_KEY: key, RECENT_ITEMS: recent, **totals, TIMESTAMP_FIELD: at})
        seen.append({USER_KEY: key, SEEN_ITEMS: seen_items, TIMESTAMP_FIELD: at})
    return (pd.DataFrame(history, columns=[USER_KEY, RECENT_ITEMS, *counts, TIMESTAMP_FIELD]),
            pd.DataFrame(seen, columns=[USER_KEY, SEEN_ITEMS, TIMESTAMP_FIELD]))


def push_event_rows(store: "FeatureStore", history: pd.DataFrame, seen: pd.DataFrame) -> None:
    """Write the rows of `event_rows` to the online store through the views' push sources."""
    from feast.data_source import PushMode

    store.push(USER_HISTORY_PUSH, history, to=PushMode.ONLINE)
    store.push(USER_SEEN_PUSH, seen, to=PushMode.ONLINE)
