"""Serving: top-k items for users from one published bundle, Feast online features and the user tower.

`Recommender` loads a bundle once (user tower, encoder, schema, index) with the Feast online store,
and answers many requests: the CLI builds one per call, a long-running service keeps one per live
version. The same feature views that fed training (user static features, recent_items) are read
online, so the user tower sees at serving time what it saw in training. Heavy libraries (feast,
torch, qdrant) are imported in `Recommender.load`, so reading an ids file stays cheap.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from contextlib import nullcontext
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.errors import DataContractError, PublishError
from flows.serving.store import BUNDLE_JSON, BundleStore, model_digest, read_additions, read_ops, read_removed
from flows.serving.ids import RESULT_COLUMNS
from flows.sources.normalize import coerce_id  # noqa: F401 (coerce_id: the serving API's)

SIMILAR_COLUMNS = ["item_id", "rank", "score"]
UPSERT_CHUNK = 32      # items per index write: a read waits for at most one chunk (~30 ms in local mode)
# Users per online-store read + user tower pass + index query batch.
BATCH_USERS = 1024
# online_user_features bookkeeping columns that are not user tower inputs.
NOT_TOWER_INPUTS = ("seen_items", "known")
# One user's answer: (user_id, cold_start, [(item_id, score), ...] best first).
Answer = tuple[Any, bool, list[tuple[Any, float]]]


def _unique(values: list) -> list:
    """Order-preserving de-duplication: a user listed twice is answered once."""
    return list(dict.fromkeys(values))


class Recommender:
    """One published bundle, loaded once: user tower + encoder + schema + index, and the Feast
    online store. Not thread-safe for concurrent writes (`add_items`); searches may share it."""

    def __init__(self, bundle_dir: Path, meta: dict[str, Any], schema: dict[str, Any], model: Any,
                 index: Any, store: Any, scratch: Path | None = None):
        self.bundle_dir = bundle_dir
        self.meta = meta
        self.schema = schema
        self.model = model
        self.index = index
        self.store = store
        self.scratch = scratch      # a private copy of the index (see `load`), removed on close

    @classmethod
    def load(cls, bundle_dir: Path, feast_dir: Path, features_dir: Path,
             copy_if_held: bool = False, private: bool = False, one_shot: bool = False) -> "Recommender":
        """Open a complete bundle (versions/<version>/) with the online store of feast_dir.

        An embedded index is opened by one process at a time. With copy_if_held (the CLI), an
        index held by another process (a running service) is searched in a private copy instead:
        the same vectors and the items added so far, at the cost of copying the folder. With
        private (the service's reader processes), an embedded index is always a private copy: the
        writer process holds the original (flows/serving/writer.py).

        one_shot (a CLI call that answers and exits): load only what answering users needs. The
        user tower runs in numpy (models/numpy_user_tower.py) when the bundle has its weights, a
        qdrant-local bundle is searched from its own files (index/arrays.py `BundleArrays`, with
        the sidecar's additions and removals), and Feast is not imported (a SQLite store's user
        rows are read by features/online_sqlite.py, as every Recommender reads them; Redis: Feast
        imported without torch): on the demo 3.7-4.6 s became 1.5-2.0 s, then 1.0 s. Such a
        Recommender answers and cannot add items."""
        from features.online_sqlite import open_user_rows
        from flows.serving.index import EMBEDDED, IndexInUse, IndexSettings, open_index

        bundle_dir = Path(bundle_dir)
        meta_path = bundle_dir / BUNDLE_JSON
        if not meta_path.is_file():
            raise PublishError(f"{bundle_dir}: not a complete bundle (no {BUNDLE_JSON})")
        meta = json.loads(meta_path.read_text())
        # The user tower must be the one whose item tower filled the index, or the scores mean nothing.
        if model_digest(bundle_dir / "model") != meta.get("model_digest"):
            raise PublishError(f"{bundle_dir / 'model'}: the model files differ from the ones published "
                               f"({meta_path}); publish again or roll back")
        schema = json.loads((bundle_dir / "schema.json").read_text())
        settings = IndexSettings.from_dict(meta["settings"])
        model = None
        if one_shot:
            from models.numpy_user_tower import load_numpy_user_encoder
            model = load_numpy_user_encoder(bundle_dir / "model")   # None: published before it existed
        # a SQLite store's rows read without Feast (features/online_sqlite.py), before torch: a Redis
        # store is read through Feast, imported without torch if nothing imported torch yet
        store = open_user_rows(feast_dir, features_dir)
        if model is None:
            from models.inference import load_bundle
            model = load_bundle(bundle_dir / "model")
        index, scratch = None, None
        # the published files hold the catalog as built; the sidecar's changes are applied below
        from_files = one_shot and meta["backend"] == "qdrant-local"
        if from_files:
            from flows.serving.index.arrays import BundleArrays
            index = BundleArrays(bundle_dir, settings, schema.get("item_features", {}))
        elif not (private and meta["backend"] in EMBEDDED):
            try:
                index = open_index(meta["backend"], settings, path=bundle_dir / "index",
                                   collection=meta.get("collection"))
            except IndexInUse:
                if not copy_if_held:
                    raise
        if index is None:
            index, scratch = _open_copy(bundle_dir, meta["backend"], settings)
        rec = cls(bundle_dir, meta, schema, model, index, store, scratch)
        if scratch is not None or from_files:
            rec.sync_own_additions()     # the sidecar's additions and removals the index in hand lacks
        else:
            # removals are hidden in memory, not in the index's storage: whoever opens it applies them
            rec.index.hide(sorted(read_removed(bundle_dir), key=str))
        return rec

    @classmethod
    def load_live(cls, published_dir: Path, feast_dir: Path, features_dir: Path) -> "Recommender":
        return cls.load(BundleStore(published_dir).live_dir(), feast_dir, features_dir)

    @property
    def version(self) -> str:
        return self.meta["version"]

    def recommend(self, user_ids: list, k: int, exclude_seen: bool = True,
                  filter: Mapping[str, Any] | None = None, batch_users: int = BATCH_USERS) -> pd.DataFrame:
        """Columns user_id, item_id, rank (1..k), score (cosine), cold_start; best first per user,
        users in input order (each once). Unknown users get the tower's answer for default features,
        flagged cold_start. Items the user interacted with (`seen_items`) are left out unless
        exclude_seen is False; `filter` keeps only items whose payload matches (see index.base)."""
        from flows.serving.index.base import id_array

        answers = self.answer(user_ids, k, exclude_seen, filter, batch_users)
        # Column-wise (not one tuple per row): a 943-user, k=100 batch is 94k rows.
        lengths = np.array([len(hits) for _, _, hits in answers], dtype=np.int64)
        flat = list(chain.from_iterable(hits for _, _, hits in answers))
        # two comprehensions, not zip(*flat): unpacking 94k tuples as arguments took 0.2 s here
        items, scores = [i for i, _ in flat], [sc for _, sc in flat]
        users = pd.Series([u for u, _, _ in answers], dtype=object)
        out = pd.DataFrame({
            "user_id": users.repeat(lengths).reset_index(drop=True),
            "item_id": id_array(items),
            "rank": np.concatenate([np.arange(1, n + 1) for n in lengths]) if len(lengths) else np.zeros(0, np.int64),
            "score": np.asarray(scores, dtype=np.float64),
            "cold_start": np.repeat(np.array([c for _, c, _ in answers], dtype=bool), lengths),
        }, columns=RESULT_COLUMNS)
        if self.schema.get("user_id_dtype") == "int64" and len(out):
            out["user_id"] = out["user_id"].astype("int64")
        return out

    def answer(self, user_ids: list, k: int, exclude_seen: bool = True,
               filter: Mapping[str, Any] | None = None, batch_users: int = BATCH_USERS) -> list[Answer]:
        """What `recommend` tabulates, without the DataFrame (the service's path): per distinct
        user in input order, (user_id, cold_start, [(item_id, score), ...] best first). A user
        whose filter matches nothing is still listed, with no hits."""
        from flows.serving.index import BadQuery
        if k < 1:
            raise BadQuery(f"k must be at least 1, got {k}")
        users = _unique(list(user_ids))
        out: list[Answer] = []
        for start in range(0, len(users), batch_users):
            out.extend(self._batch(users[start:start + batch_users], k, exclude_seen, filter))
        return out

    def _batch(self, users: list, k: int, exclude_seen: bool, filter: Mapping[str, Any] | None) -> list[Answer]:
        from features.online import online_user_features

        feats = _aligned(online_user_features(self.store, self.schema, users), users)
        vectors = self.model.encode_users(feats.drop(columns=[c for c in NOT_TOWER_INPUTS if c in feats.columns]))
        exclude = [_as_list(s) for s in feats["seen_items"]] if exclude_seen else None
        hits = self.index.search(vectors, k, exclude=exclude, filter=filter)
        cold = ~feats["known"].astype(bool).to_numpy()
        return [(u, bool(c), user_hits) for u, c, user_hits in zip(users, cold, hits)]

    def upsert_items(self, items: pd.DataFrame, vectors: np.ndarray, lock: threading.RLock | None = None) -> None:
        """Put items (item_id + feature columns) with their vectors into the index, with the payload
        fields the index was built with (they decide what is filterable), in chunks of UPSERT_CHUNK
        each under `lock` (the served version's): a read waits for one chunk, not the whole write."""
        from flows.serving.index import catalog_payloads

        _, payloads = catalog_payloads(items, self.schema.get("item_features", {}))
        fields = self.index.settings.fields
        payloads = [{k: v for k, v in p.items() if k in fields} for p in payloads]
        ids = items["item_id"].tolist()
        for start in range(0, len(ids), UPSERT_CHUNK):
            stop = start + UPSERT_CHUNK
            with lock or nullcontext():
                self.index.upsert(ids[start:stop], vectors[start:stop], payloads[start:stop])
            time.sleep(0.0005)    # let a waiting reader take the lock before the next chunk

    def sync_own_additions(self, ops: pd.DataFrame | None = None, lock: threading.RLock | None = None) -> int:
        """Apply this bundle's sidecar (`ops`, read here when not given) to the index: upsert the added
        rows it lacks or hides (a crash between the sidecar and the upsert, or a CLI addition while a
        service held the index) and hide the removed ones (the hidden set lives in memory); returns
        how many were upserted."""
        ops = read_ops(self.bundle_dir) if ops is None else ops
        own = read_additions(self.bundle_dir, ops)
        index = self.index
        missing = own[[not index.has(i) or i in index.hidden for i in own["item_id"].tolist()]] if len(own) else own
        if len(missing):
            self.upsert_items(missing.drop(columns="vector"),
                              np.stack(missing["vector"].to_numpy()).astype(np.float32), lock)
        removed = read_removed(self.bundle_dir, ops) - index.hidden
        if removed:
            with lock or nullcontext():
                index.hide(sorted(removed, key=str))
        return len(missing)

    def similar(self, item_id: Any, k: int, filter: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Items nearest to an indexed item (itself left out): item_id, rank, score."""
        hits = self.index.similar(item_id, k, filter=filter)
        return pd.DataFrame([(i, r, s) for r, (i, s) in enumerate(hits, start=1)], columns=SIMILAR_COLUMNS)

    def close(self) -> None:
        self.index.close()
        from features.online_sqlite import SqliteUserRows
        if isinstance(self.store, SqliteUserRows):
            self.store.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "Recommender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_copy(bundle_dir: Path, backend: str, settings: Any) -> tuple[Any, Path]:
    """The bundle's embedded index copied to a scratch folder (items are not being added while
    it is copied) and opened there."""
    from flows.serving.index import copy_storage, open_index

    scratch = Path(tempfile.mkdtemp(prefix="towerflow-index-copy-"))
    try:
        with BundleStore.containing(bundle_dir).additions_locked():
            path = copy_storage(bundle_dir / "index", scratch)
        index = open_index(backend, settings, path=path)
        index.keep_writes_in_memory()     # thrown away on close: added items need not reach its files
        return index, scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


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
