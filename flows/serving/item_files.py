"""`towerflow index add-items FILE` and `towerflow index remove-items`: the live version's
catalog changed from the command line, through the same sidecar as POST /items and DELETE
/items/{id} (flows/serving/items.py).

When a running service holds the embedded index (one process at a time), only the sidecar is
written and the service applies it within serve.reload_interval_s.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.serving.bundles import BUNDLE_JSON, BundleStore
from flows.serving.items import add_items, catalog_ids, normalize_items, remove_items, sync_additions
from flows.serving.recommend import Recommender, coerce_id


@contextmanager
def _live(published_dir: Path) -> Iterator[tuple[Recommender, set[Any], bool]]:
    """The live version with its index when no service holds it: (recommender, known ids, index open)."""
    from flows.serving.index import IndexInUse, IndexSettings, open_index
    from models.inference import load_bundle

    bundle = BundleStore(published_dir).live_dir()
    meta = json.loads((bundle / BUNDLE_JSON).read_text())
    schema = json.loads((bundle / "schema.json").read_text())
    index = None
    if (bundle / "index").is_dir():
        try:
            index = open_index(meta["backend"], IndexSettings.from_dict(meta["settings"]), path=bundle / "index",
                               collection=meta.get("collection"))
        except IndexInUse:   # held by the running service: it picks the sidecar up
            index = None
    rec = Recommender(bundle, meta, schema, load_bundle(bundle / "model"), index, store=None)
    try:
        known = catalog_ids(bundle)
        if index is not None:
            sync_additions(rec, published_dir, known)
        yield rec, known, index is not None
    finally:
        if index is not None:
            index.close()


def add_items_file(published_dir: Path, path: Path) -> tuple[str, int, bool]:
    """(version, items added, index updated now)."""
    from flows.serving.events import file_rows, read_frame

    schema = json.loads((BundleStore(published_dir).live_dir() / "schema.json").read_text())
    items = normalize_items(read_frame(path), schema, str(path), file_rows(path))
    with _live(published_dir) as (rec, known, now):
        add_items(rec, published_dir, items, known, upsert=now)
    return rec.version, len(items), now


def remove_items_ids(published_dir: Path, ids: list[str]) -> tuple[str, int, bool]:
    """(version, items removed, index updated now). `ids` as typed on the command line."""
    schema = json.loads((BundleStore(published_dir).live_dir() / "schema.json").read_text())
    typed = list(dict.fromkeys(coerce_id(i, schema["item_id_dtype"], "--id") for i in ids))
    with _live(published_dir) as (rec, known, now):
        remove_items(rec, published_dir, typed, known, apply=now)
    return rec.version, len(typed), now
