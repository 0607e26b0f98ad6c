"""Serving-time user features from the Feast online store (the views the training examples used)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from features.definitions import (
    RECENT_ITEMS,
    SEEN_ITEMS,
    USER_HISTORY_FV,
    USER_KEY,
    USER_SEEN_FV,
    feature_columns,
    is_count_column,
    user_static_refs,
)

if TYPE_CHECKING:
    from feast import FeatureStore


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


def behaviour_counts(store: "FeatureStore") -> list[str]:
    """The count features of the registered user_history_fv (their windows are a materialize param)."""
    # the cached registry (as get_online_features reads it): a fresh read costs ~4 ms per request
    view = store.get_feature_view(USER_HISTORY_FV, allow_registry_cache=True)
    return [f.name for f in view.features if is_count_column(f.name)]


def online_user_features(store: "FeatureStore", schema: dict, user_ids: list) -> pd.DataFrame:
    """One row per requested id, in order: user_id, user features, recent_items, the behaviour
    counts, seen_items, known.

    Unknown users (never materialized, or an id of the wrong type) get known=False, null features,
    empty lists and zero counts, never an exception: serving falls back to a cold-start query for
    them. A known user without interactions has zero counts too (as offline: nothing before).
    """
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    columns = feature_columns(schema, "user")
    counts = behaviour_counts(store)
    keys = [_coerce(u, schema["user_id_dtype"]) for u in user_ids]
    lookup = list(dict.fromkeys(k for k in keys if k is not None))
    found: dict[Any, dict[str, Any]] = {}
    if lookup:
        refs = [*user_static_refs(schema), f"{USER_HISTORY_FV}:{RECENT_ITEMS}",
                *(f"{USER_HISTORY_FV}:{c}" for c in counts), f"{USER_SEEN_FV}:{SEEN_ITEMS}"]
        response = store.get_online_features(features=refs,
                                             entity_rows=[{USER_KEY: k} for k in lookup])
        values = response.to_dict()
        names = list(response.proto.metadata.feature_names.val)
        # A user is known when any of its views has a value; the key column is always PRESENT.
        # Redis marks a missing key PRESENT with a null value (SQLite: NOT_FOUND), so both count.
        present = [any(r.statuses[i] == FieldStatus.PRESENT and values[name][i] is not None
                       for name, r in zip(names, response.proto.results) if name != USER_KEY)
                   for i in range(len(lookup))]
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
