"""Serving: top-k items for users from Feast online features, the user tower and the Qdrant alias.

The same feature views that fed training (user static features, recent_items) are read online, so
the user tower sees at serving time what it saw in training. Heavy libraries (feast, torch,
qdrant_client) are imported inside `recommend`, so reading an ids file stays cheap.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from flows.errors import ConfigError, DataContractError, MissingStageInput, PublishError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RESULT_COLUMNS = ["user_id", "item_id", "rank", "score"]
# online_user_features bookkeeping columns that are not user tower inputs.
NOT_TOWER_INPUTS = ("seen_items", "known")


def parse_id(text: str, id_dtype: str, where: str) -> int | str:
    """One id as the schema's dtype; `where` names the source in the error (file:line)."""
    if id_dtype == "string":
        return text
    if id_dtype != "int64":
        raise ConfigError(f"schema.json: user_id_dtype must be 'int64' or 'string', got {id_dtype!r}")
    try:
        value = int(text)
    except ValueError:
        raise DataContractError(f"{where}: '{text}' is not an int64 user id") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise DataContractError(f"{where}: '{text}' is out of the int64 range")
    return value


def read_ids_file(path: Path, id_dtype: str) -> list:
    """User ids from a text file, one per line; an optional first line `user_id` is a header and
    blank lines are skipped. Ids are returned as the schema's dtype ('int64' -> int, 'string' -> str)."""
    if not path.is_file():
        raise DataContractError(f"{path}: users file not found")
    ids: list[int | str] = []
    first = True
    # utf-8-sig: files saved by spreadsheet tools start with a BOM.
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if first and text == "user_id":
            first = False
            continue
        first = False
        ids.append(parse_id(text, id_dtype, f"{path}:{lineno}"))
    if not ids:
        raise DataContractError(f"{path}: no user ids found (one id per line, optional header 'user_id')")
    return ids


def _read_json(path: Path, upstream: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingStageInput(f"{path}: not found; run the {upstream} stage first")
    return json.loads(path.read_text())


def _unique(values: list) -> list:
    """Order-preserving de-duplication: a user listed twice is answered once."""
    return list(dict.fromkeys(values))


def recommend(
    user_ids: list,
    k: int,
    include_seen: bool,
    *,
    model_dir: Path,
    feast_dir: Path,
    features_dir: Path,
    schema_path: Path,
    index_dir: Path,
    qdrant_path: Path,
    alias: str,
) -> pd.DataFrame:
    """Columns user_id, item_id, rank (1..k), score (cosine), best first per user, users in input order.

    Unknown users get the tower's answer for default features (cold start). Items the user already
    interacted with (the `seen_items` online feature) are dropped unless include_seen.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    users = _unique(list(user_ids))
    if not users:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    schema = _read_json(schema_path, "ingest")
    manifest = _read_json(index_dir / "manifest.json", "publish")

    from features.online import online_user_features
    from features.store import open_store
    from flows.serving.bundle import model_digest
    from flows.serving.index import open_qdrant, query_top_k
    from models.errors import ModelNotFound
    from models.inference import load_bundle

    try:
        bundle = load_bundle(model_dir)
    except ModelNotFound as exc:
        raise MissingStageInput(f"{exc}; run the train stage first") from exc
    # The user tower must be the one whose item tower filled the index, or the scores mean nothing.
    if manifest.get("model_digest") != model_digest(model_dir) or bundle.dim != manifest.get("dim"):
        raise PublishError(f"{model_dir} is not the model the published index was built from "
                           f"({index_dir / 'manifest.json'}); run the publish stage")
    feats = _aligned(online_user_features(open_store(feast_dir, features_dir), schema, users), users)
    vectors = bundle.encode_users(feats.drop(columns=[c for c in NOT_TOWER_INPUTS if c in feats.columns]))
    exclude = None if include_seen else [_as_list(s) for s in feats["seen_items"]]

    with open_qdrant(qdrant_path) as client:
        hits = query_top_k(client, alias, vectors, k, exclude=exclude)

    rows = [(u, item, rank, score) for u, user_hits in zip(users, hits)
            for rank, (item, score) in enumerate(user_hits, start=1)]
    out = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    if schema.get("user_id_dtype") == "int64" and len(out):
        out["user_id"] = out["user_id"].astype("int64")
    return out


def _as_list(value: Any) -> list:
    """seen_items as a list: None/NaN for a user with no history becomes []."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return list(value)


def _aligned(feats: pd.DataFrame, users: list) -> pd.DataFrame:
    """Rows in the order of `users` (the query vectors are matched to users by position)."""
    if list(feats["user_id"]) == users:
        return feats.reset_index(drop=True)
    position = {u: i for i, u in enumerate(feats["user_id"])}
    missing = [u for u in users if u not in position]
    if missing:
        raise DataContractError(f"online features returned no row for user_id {missing[0]!r}")
    return feats.iloc[[position[u] for u in users]].reset_index(drop=True)
