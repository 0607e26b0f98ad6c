"""Stage publish: the trained model, its item vectors and their index, verified, as one live bundle.

Serving reads only published bundles (flows.serving.bundles), never artifacts/model/: a training
run that wrote a broken model is refused here and the live bundle keeps answering.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flows.errors import MissingStageInput, PublishError
from flows.params import PublishParams
from flows.serving.bundles import open_store, version_name
from flows.serving.store import MODEL_DIR, MODEL_FILES, RANKER_DIR, BundleStore, model_digest
from flows.serving.index import IndexSettings, catalog_payloads, choose_backend, create_index, pause_point
from flows.serving.index.base import collection_name, server_url
from flows.reports.live import bundle_eval_model, bundle_reports, lineage, require_passed
from flows.serving.verify import check_vectors, verify_index
from models.encoding import read_rows
from models.numpy_user_tower import USER_TOWER_FILE, export_user_tower

REQUIRED_MODEL_FILES = ("model.pt", "encoder.json")
# The stage's DVC output: what this run published. Not the bundles themselves, which rollbacks
# change outside DVC; were they the output, `dvc repro` would see a rollback as a changed output
# and publish again.


def publish(model_dir: Path, training_dir: Path, schema_path: Path, cfg: PublishParams,
            published_dir: Path, seed: int = 0, reports_dir: Path | None = None,
            ranker_dir: Path | None = None, eval_model_dir: Path | None = None) -> dict[str, Any]:
    """Encode training_dir/items.parquet with the model in model_dir and publish both as a bundle.

    Writes published_dir/versions/<version>/ (model/, schema.json, item_vectors.parquet,
    items.parquet, index/, bundle.json), then replaces published_dir/LIVE, appends to
    published_dir/history.jsonl and writes published_dir/last_publish.json (the summary returned);
    removes builds left by killed runs and complete versions beyond cfg.keep_versions (never the
    live one). The same content as the live bundle changes nothing; content that a rollback took
    off live is refused. Any failure raises PublishError / MissingStageInput and leaves LIVE alone.
    With reports_dir (the pipeline's case), nothing is published unless reports_dir/gate.json says
    this run passed the gate, and the run's metrics, quality, gate decision and drift reference are
    copied into the bundle: the next run's gate compares against them. ranker_dir (the rank stage's
    output) is copied into the bundle's ranker/: `rerank` serves the ranker of the live version,
    and a rollback brings back its own. With eval_model_dir (the train stage's eval/), its model is
    kept as eval_model/: the one the next run scores on its holdout (the served model was refit on
    every row, that holdout included).
    """
    if reports_dir is not None:
        require_passed(reports_dir / "gate.json")
    items, schema = _inputs(model_dir, training_dir, schema_path)
    store = open_store(published_dir)
    live = store.live()
    try:
        return _publish(model_dir, training_dir, schema, items, cfg, store, seed, reports_dir, ranker_dir,
                        eval_model_dir)
    except PublishError as exc:
        raise PublishError(f"publish refused: {exc}; the live version ({live or 'none'}) is unchanged") from exc


def _inputs(model_dir: Path, training_dir: Path, schema_path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    items_path = training_dir / "items.parquet"
    if not items_path.is_file():
        raise MissingStageInput(f"{items_path}: not found; run the materialize stage first")
    for name in REQUIRED_MODEL_FILES:
        if not (model_dir / name).is_file():
            raise MissingStageInput(f"{model_dir / name}: not found; run the train stage first")
    if not schema_path.is_file():
        raise MissingStageInput(f"{schema_path}: not found; run the ingest stage first")
    items = pd.read_parquet(items_path)
    if "item_id" not in items.columns:
        raise PublishError(f"{items_path}: no 'item_id' column")
    return items, json.loads(schema_path.read_text())


def _publish(model_dir: Path, training_dir: Path, schema: dict[str, Any], items: pd.DataFrame,
             cfg: PublishParams, store: BundleStore, seed: int, reports_dir: Path | None,
             ranker_dir: Path | None, eval_model_dir: Path | None = None) -> dict[str, Any]:
    from models.inference import load_bundle   # torch: only when a stage really publishes

    try:
        model = load_bundle(model_dir)
    except Exception as exc:   # a truncated or foreign model.pt: refuse, say which file
        raise PublishError(f"{model_dir}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    ids = items["item_id"].tolist()
    vectors = np.asarray(model.encode_items(items), dtype=np.float32)
    check_vectors(vectors, ids, len(items), model.dim)
    fields, payloads = catalog_payloads(items, schema.get("item_features", {}))
    backend = choose_backend(cfg.backend, len(items), cfg.local_max_items, server=server_url() is not None)
    settings = IndexSettings(dim=model.dim, fields=fields,
                             id_kind="keyword" if schema.get("item_id_dtype") == "string" else "integer",
                             hnsw_m=cfg.hnsw_m, hnsw_ef_construct=cfg.hnsw_ef_construct, search_ef=cfg.search_ef,
                             quantization=cfg.quantization, upsert_batch=cfg.upsert_batch)
    ranker_dir = ranker_dir if ranker_dir is not None and ranker_dir.is_dir() else None
    digest = content_digest(model_dir, ids, vectors, payloads, backend, settings, ranker_dir)

    with store.locked():
        cleaned = store.clean_partials()
        live = store.live()
        # A LIVE naming a deleted folder is replaced like any other: publishing is the repair.
        if live is not None and live in store.complete() and store.meta(live).get("digest") == digest:
            summary = {"action": "unchanged", "version": live, "backend": backend, "count": len(ids), "cleaned": cleaned}
            store.write_last_publish(summary)
            return summary
        version = store.find_digest(digest)   # e.g. a run killed before its switch
        undone = store.rolled_back_from(version) if version else None
        if undone is not None:
            # A scheduled rerun must not undo a deliberate rollback by re-publishing the same bundle.
            raise PublishError(f"this content is version {version}, rolled back by {undone['who']} at "
                               f"{undone['when']} ({undone['reason']}); to serve it again on purpose: "
                               f"`towerflow index rollback --to {version}`")
        action = "reused" if version else "built"
        if version is None:
            version = version_name(digest)
            queries = user_sample(model, training_dir, schema, cfg.verify_users, seed)
            _build(store, version, model_dir, model, items, schema, vectors, payloads, queries, backend, settings,
                   cfg, digest, live, reports_dir, ranker_dir, eval_model_dir)
        pause_point("switch")
        previous = store.switch(version, "publish", f"{action} from {model_dir}")
        pruned = store.prune(cfg.keep_versions)
    meta = store.meta(version)
    summary = {"action": action, "version": version, "previous": previous, "backend": backend,
            "count": meta["count"], "recall_at_100": meta["verification"].get("recall_at_100"),
            "pruned": pruned, "cleaned": cleaned}
    store.write_last_publish(summary)
    return summary


def content_digest(model_dir: Path, ids: list, vectors: np.ndarray, payloads: list[dict], backend: str,
                   settings: IndexSettings, ranker_dir: Path | None = None) -> str:
    """What makes two bundles the same: model files, ranker files, catalog ids, vectors, payloads and
    index settings."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode())
            h.update((model_dir / name).read_bytes())
    for path in sorted(ranker_dir.rglob("*")) if ranker_dir is not None else []:
        if path.is_file():
            h.update(f"{RANKER_DIR}/{path.relative_to(ranker_dir).as_posix()}".encode())
            h.update(path.read_bytes())
    h.update(json.dumps(ids, default=str).encode())
    h.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    h.update(json.dumps(payloads, sort_keys=True, default=str).encode())
    h.update(json.dumps({"backend": backend, **settings.to_dict()}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def user_sample(model: Any, training_dir: Path, schema: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """User vectors for the recall check: each sampled user's latest training example, encoded by
    the user tower. Without examples, item vectors stand in (still a check of the ANN search)."""
    path = training_dir / "examples.parquet"
    if not path.is_file():
        return np.zeros((0, model.dim), np.float32)
    names = pq.read_schema(path).names
    kinds = schema.get("user_features", {})
    wanted = {"user_id", "recent_items", *(c for cs in kinds.values() for c in cs)}
    columns = [c for c in names if c in wanted or c.startswith("interactions_")]
    # the user ids decide which rows; only those rows' columns (history lists: 6 GB at 10M) are read
    users = pq.read_table(path, columns=["user_id"]).column("user_id").to_numpy()
    latest = np.flatnonzero(~pd.Series(users).duplicated(keep="last").to_numpy())
    rng = np.random.default_rng(seed)
    picked = latest[np.sort(rng.choice(len(latest), size=min(n, len(latest)), replace=False))]
    return np.asarray(model.encode_users(read_rows(path, picked, columns)), dtype=np.float32)


def _build(store: BundleStore, version: str, model_dir: Path, model: Any, items: pd.DataFrame,
           schema: dict[str, Any], vectors: np.ndarray, payloads: list[dict], queries: np.ndarray, backend: str,
           settings: IndexSettings, cfg: PublishParams, digest: str, live: str | None,
           reports_dir: Path | None = None, ranker_dir: Path | None = None,
           eval_model_dir: Path | None = None) -> None:
    collection = collection_name(cfg.collection_prefix, version) if backend == "qdrant-server" else None
    partial = store.partial(version, {"backend": backend, "collection": collection})
    try:
        _write_files(partial, model_dir, items, schema, vectors, model)
        if reports_dir is not None:
            bundle_reports(reports_dir, partial)
        if ranker_dir is not None:
            shutil.copytree(ranker_dir, partial / RANKER_DIR)
        if eval_model_dir is not None:
            bundle_eval_model(eval_model_dir, partial)
        (partial / "index").mkdir()   # a server bundle keeps it empty: the collection is on the server
        index = create_index(backend, settings, path=partial / "index", collection=collection)
        try:
            ids = items["item_id"].tolist()
            index.build(vectors, ids, payloads)
            if len(queries) == 0:
                queries = vectors[:: max(1, len(vectors) // max(1, cfg.verify_users))][: cfg.verify_users]
            figures = verify_index(index, vectors, ids, queries, min_recall=cfg.min_recall,
                                   sample=cfg.verify_sample, max_search_ef=cfg.max_search_ef)
            settings = index.settings     # with the search_ef that passed: serving searches with it
        finally:
            index.close()
        meta = {"version": version, "digest": digest, "model_digest": model_digest(model_dir), "backend": backend,
                "collection": collection, "alias": cfg.alias if collection else None, "count": len(ids),
                "dim": settings.dim, "distance": "cosine", "item_id_dtype": schema.get("item_id_dtype"),
                "settings": settings.to_dict(), "verification": figures, "created_at": _now(), "previous": live,
                "ranker": (partial / RANKER_DIR).is_dir(),
                # the next run is compared with this model only on the same source (flows/reports/live.py)
                "lineage": lineage(schema)}
        store.promote(partial, version, meta)
    except BaseException:
        # The build is not live and never will be: remove it now (a kill leaves it to the next run).
        store.clean_partials()
        raise


def _write_files(folder: Path, model_dir: Path, items: pd.DataFrame, schema: dict[str, Any],
                 vectors: np.ndarray, model: Any) -> None:
    (folder / MODEL_DIR).mkdir()
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, folder / MODEL_DIR / name)
    # the user tower's weights for readers without torch (a one-shot `towerflow recommend`); derived
    # from model.pt, so not part of the content digest (np.savez stamps its zip entries with the time)
    export_user_tower(model.model, folder / MODEL_DIR / USER_TOWER_FILE)
    (folder / "schema.json").write_text(json.dumps(schema, indent=2) + "\n")
    features = [c for cs in schema.get("item_features", {}).values() for c in cs if c in items.columns]
    items[["item_id", *features]].to_parquet(folder / "items.parquet", index=False)
    # Fixed-size float32 lists: compact, and read back as an (n, dim) array in one reshape.
    table = pa.table({
        "item_id": pa.Array.from_pandas(items["item_id"].reset_index(drop=True)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
    })
    pq.write_table(table, folder / "item_vectors.parquet")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")   # orders versions of one second
