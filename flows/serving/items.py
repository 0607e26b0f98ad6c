"""New items without retraining: encode them with the live item tower, upsert them into its index.

    POST /items  or  towerflow index add-items FILE       {item_id, <item feature columns>...}

A bundle is immutable except for one append-only sidecar, `<bundle>/added_items/`: one parquet
file per addition (item_id, the item feature columns, the vector this bundle's item tower gave
it), written (tmp + fsync + rename) before the index is touched. So:
- a crash between the sidecar and the upsert is repaired by `sync_additions` on the next load
  (rows of the own sidecar missing from the index are upserted from their stored vectors);
- a rollback or a new publish knows about them: `sync_additions` also takes the items added to the
  other kept versions that this one lacks, encodes them with its own item tower (another model's
  vectors mean nothing here) and records them in its own sidecar;
- while the service holds an embedded index (one process at a time), the CLI writes the sidecar
  only and the service's watcher upserts it within serve.reload_interval_s.
The next pipeline run trains on them only if the source's items table holds them (see the report).

Removal (DELETE /items/{id}, `towerflow index remove-items`) is a tombstone in the same sidecar (a
file of item_id + removed=true), replayed like the additions: the item leaves the catalog and every
answer (its index point stays, hidden), in this version and, on their next load, in the other kept
versions and in new ones (a catalog item too), until it is added again. For one item, the newest
operation across the kept versions wins (files are named by UTC time, so names sort in time).
Index writes go in chunks of UPSERT_CHUNK under the caller's lock, so reads go on between them.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from datetime import datetime, timezone
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from flows.errors import DataContractError
from flows.serving.events import row_field
from flows.serving.index.base import plain
from flows.serving.recommend import Recommender, coerce_id
# The sidecar's format and lock belong to the store; imported here by name for this module's callers.
from flows.serving.store import (  # noqa: F401
    ADDITIONS_LOCK, ADDITIONS_WAIT_S, BundleStore, catalog_ids, latest_ops, read_additions, read_ops, read_removed,
    sidecar_signature, write_additions,
)

_SEQ = count()


class ItemExists(DataContractError):
    """An added item's id is already in the catalog (HTTP 409)."""


class UnknownItem(DataContractError):
    """An item to remove is not in the catalog (HTTP 404)."""


class RepeatedItem(DataContractError):
    """An item id given twice in one request (HTTP 409, as for an id already in the catalog)."""


class UnencodableItem(DataContractError):
    """An item whose feature values the item tower cannot turn into a vector (HTTP 422)."""


def _shown(features: pd.Series) -> str:
    return "{" + ", ".join(f"{k}: {plain(v)!r}"[:80] for k, v in features.items()) + "}"


def item_kinds(schema: dict[str, Any]) -> dict[str, str]:
    """Item feature column -> categorical | numeric | multi, from schema.json."""
    features = schema.get("item_features", {})
    return {c: kind for kind in ("categorical", "numeric", "multi") for c in features.get(kind, [])}


def _feature(value: Any, kind: str, where: str) -> Any:
    """One feature value as the catalog stores it (string / float / list of strings); None = missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if kind == "multi":
        if isinstance(value, str):   # CSV has no lists: 'a|b|c' as in the contract
            return [v for v in value.split("|") if v]
        if isinstance(value, (list, tuple, np.ndarray)):
            return [str(v) for v in value if v is not None]
        raise DataContractError(f"{where}: {value!r} is not a list of values")
    if kind == "numeric":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataContractError(f"{where}: {value!r} is not a number") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise DataContractError(f"{where}: {value!r} is not a finite number")
        return number
    if isinstance(value, (dict, list)):
        raise DataContractError(f"{where}: {value!r} is not a single categorical value")
    return str(value)


def normalize_items(frame: pd.DataFrame, schema: dict[str, Any], where: str,
                    rows: Callable[[int], str] | None = None) -> pd.DataFrame:
    """item_id + the schema's item feature columns, typed like the catalog. Unknown columns, ids of
    the wrong type, repeated ids and bad values raise DataContractError naming them (a row as
    `rows(i)`, default `where[i]`; a file's by its lines, events.file_rows)."""
    row = rows or (lambda i: f"{where}[{i}]")
    kinds = item_kinds(schema)
    unknown = [c for c in frame.columns if c != "item_id" and c not in kinds]
    if unknown:
        raise DataContractError(f"{where}: unknown item feature column '{unknown[0]}'; the live model's item "
                                f"features are: {', '.join(kinds) or 'none'}")
    if "item_id" not in frame.columns:
        raise DataContractError(f"{where}: missing required column 'item_id'")
    if frame.empty:
        raise DataContractError(f"{where}: no items")
    frame = frame.reset_index(drop=True)
    out = pd.DataFrame({"item_id": [coerce_id(v, schema["item_id_dtype"], row_field(row(i), "item_id"))
                                    for i, v in enumerate(frame["item_id"])]})
    repeated = out["item_id"][out["item_id"].duplicated()].tolist()
    if repeated:
        raise RepeatedItem(f"{where}: item_id {repeated[0]!r} appears more than once")
    for col, kind in kinds.items():
        values = frame[col].tolist() if col in frame.columns else [None] * len(frame)
        out[col] = pd.Series([_feature(v, kind, row_field(row(i), col)) for i, v in enumerate(values)],
                             dtype="float64" if kind == "numeric" else object)
    return out


def additions_locked(published_dir: Path, wait_s: float = ADDITIONS_WAIT_S) -> Any:
    """One addition or removal at a time across processes (BundleStore.additions_locked): a wait past
    wait_s raises StoreBusy (a LockBusy: the service answers 503 with Retry-After)."""
    return BundleStore(published_dir).additions_locked(wait_s)


def _write_sidecar(bundle_dir: Path, table: pa.Table) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return write_additions(bundle_dir, f"{stamp}-{os.getpid()}-{next(_SEQ)}", table)


def _additions_table(items: pd.DataFrame, vectors: np.ndarray) -> pa.Table:
    return pa.Table.from_pandas(items.reset_index(drop=True), preserve_index=False).append_column(
        "vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]))


def _tombstones(ids: Sequence[Any]) -> pa.Table:
    return pa.table({"item_id": pa.array(list(ids)), "removed": pa.array([True] * len(ids))})


def _encode(rec: Recommender, items: pd.DataFrame) -> np.ndarray:
    vectors = np.asarray(rec.model.encode_items(items), dtype=np.float32)
    bad = ~np.isfinite(vectors).all(axis=1) | (np.abs(vectors).sum(axis=1) == 0)
    if bad.any():
        # the item's own values (a numeric feature of 1e289) put the tower out of range: the
        # request's problem (422), not the service's
        row = items.iloc[int(np.flatnonzero(bad)[0])]
        raise UnencodableItem(f"item_id {plain(row['item_id'])!r}: the item tower of version {rec.version} gives "
                              f"its features {_shown(row.drop('item_id'))} a zero or non-finite vector; "
                              "check them against the catalog's ranges")
    return vectors


def _refresh(bundle_dir: Path, known: set[Any]) -> None:
    """`known` as the sidecar says now: another process may have added or removed items."""
    ops = read_ops(bundle_dir)
    known |= set(read_additions(bundle_dir, ops)["item_id"].tolist())
    known -= read_removed(bundle_dir, ops)


def add_items(rec: Recommender, published_dir: Path, items: pd.DataFrame, known: set[Any],
              upsert: bool = True, lock: threading.RLock | None = None, wait_s: float = ADDITIONS_WAIT_S) -> Path:
    """Encode normalized items with rec's item tower, record them in its sidecar, then upsert them
    into its index (upsert=False: the index is held by a running service, which picks them up),
    in chunks under `lock`. `known` (catalog + added ids) is updated. Ids already there raise
    ItemExists."""
    with additions_locked(published_dir, wait_s):
        _refresh(rec.bundle_dir, known)
        taken = [i for i in items["item_id"].tolist() if i in known]
        if taken:
            raise ItemExists(f"item_id {taken[0]!r} already exists in version {rec.version}"
                             f"{f' (and {len(taken) - 1} more)' if len(taken) > 1 else ''}")
        vectors = _encode(rec, items)
        path = _write_sidecar(rec.bundle_dir, _additions_table(items, vectors))
        if upsert:
            rec.upsert_items(items, vectors, lock)
        known |= set(items["item_id"].tolist())
    return path


def remove_items(rec: Recommender, published_dir: Path, ids: list[Any], known: set[Any], apply: bool = True,
                 lock: threading.RLock | None = None, wait_s: float = ADDITIONS_WAIT_S) -> Path:
    """Record a tombstone for each id in rec's sidecar, then hide them in its index (apply=False:
    a running service holds the index and applies it). Ids not in the catalog raise UnknownItem."""
    with additions_locked(published_dir, wait_s):
        _refresh(rec.bundle_dir, known)
        missing = [i for i in ids if i not in known]
        if missing:
            raise UnknownItem(f"item_id {missing[0]!r} is not in the catalog of version {rec.version}")
        path = _write_sidecar(rec.bundle_dir, _tombstones(ids))
        if apply:
            with lock or nullcontext():
                rec.index.hide(ids)
        known -= set(ids)
    return path


def _others_latest(published_dir: Path, bundle_dir: Path) -> pd.DataFrame:
    """The newest operation per item in the sidecars of the other kept versions."""
    store = BundleStore(published_dir)
    others = [read_ops(store.versions / v) for v in store.complete() if store.versions / v != Path(bundle_dir)]
    others = [o for o in others if len(o)]
    return latest_ops(pd.concat(others, ignore_index=True)) if others else pd.DataFrame(columns=["item_id", "op"])


def sync_additions(rec: Recommender, published_dir: Path, known: set[Any], lock: threading.RLock | None = None,
                   wait_s: float = ADDITIONS_WAIT_S, reader: bool = False) -> int:
    """Bring rec's index up to date with the additions and removals of every kept version (see the
    module doc); returns how many items were upserted. `known` is updated. reader=True (a reader
    process of the service, flows/serving/writer.py): only this version's own sidecar, read without
    the lock (its files appear whole, by rename) since nobody copies a reader's private index; the
    writer process carries the other versions' operations into that sidecar, and they arrive here
    from there."""
    # index writes happen under the lock: another process may be copying this index
    with additions_locked(published_dir, wait_s) if not reader else nullcontext():
        ops = read_ops(rec.bundle_dir)
        upserted = rec.sync_own_additions(ops, lock)
    known |= set(read_additions(rec.bundle_dir, ops)["item_id"].tolist())
    known -= read_removed(rec.bundle_dir, ops)
    if reader:
        return upserted
    latest = _others_latest(published_dir, rec.bundle_dir)
    if not len(latest):
        return upserted
    own_op = dict(zip(latest_ops(ops)["item_id"].tolist(), latest_ops(ops)["op"].tolist())) if len(ops) else {}
    newer = latest[[op > own_op.get(i, "") for i, op in zip(latest["item_id"].tolist(), latest["op"].tolist())]]
    removed = newer.loc[newer["removed"].astype(bool)]
    gone = [i for i in removed["item_id"].tolist() if i in known]
    if gone:
        remove_items(rec, published_dir, gone, known, lock=lock, wait_s=wait_s)
    rows = newer.loc[~newer["removed"].astype(bool)]
    index = rec.index
    rows = rows[[i not in known and (not index.has(i) or i in index.hidden) for i in rows["item_id"].tolist()]]
    if len(rows):
        # Another version's schema may have other item features: keep the ones this model knows.
        columns = ["item_id", *(c for c in item_kinds(rec.schema) if c in rows.columns)]
        features = normalize_items(rows[columns], rec.schema, "added_items")
        add_items(rec, published_dir, features, known, lock=lock, wait_s=wait_s)
    return upserted + len(rows)
