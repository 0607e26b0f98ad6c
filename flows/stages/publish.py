"""Stage publish: encode the catalog with the published model and serve it from Qdrant.

Writes index_dir/item_vectors.parquet (item_id, vector) and index_dir/manifest.json, after the
alias has moved to a verified collection (flows.serving.index); a failed publish leaves both the
alias and index_dir as they were.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flows.errors import MissingStageInput, PublishError
from flows.params import PublishParams
from flows.serving.bundle import model_digest
from flows.serving.index import open_qdrant, publish_vectors
from models.errors import ModelNotFound
from models.inference import load_bundle

def publish(model_dir: Path, training_dir: Path, cfg: PublishParams, index_dir: Path, qdrant_path: Path) -> dict:
    """Encode data/training/items.parquet with the model in model_dir, publish it to Qdrant
    (collection `<prefix>_<version>`, alias switched after verification, old versions pruned), and
    write index_dir/item_vectors.parquet + index_dir/manifest.json. Returns the manifest."""
    items_path = training_dir / "items.parquet"
    if not items_path.is_file():
        raise MissingStageInput(f"{items_path}: not found; run the materialize stage first")
    try:
        bundle = load_bundle(model_dir)
    except ModelNotFound as exc:
        raise MissingStageInput(f"{exc}; run the train stage first") from exc
    items = pd.read_parquet(items_path)
    if "item_id" not in items.columns:
        raise PublishError(f"{items_path}: no 'item_id' column")
    vectors = np.asarray(bundle.encode_items(items), dtype=np.float32)
    if vectors.shape != (len(items), bundle.dim):
        raise PublishError(f"{model_dir}: item tower returned shape {vectors.shape} for {len(items)} items "
                           f"of dim {bundle.dim}")

    with open_qdrant(qdrant_path) as client:
        result = publish_vectors(client, vectors, items["item_id"].tolist(), prefix=cfg.collection_prefix,
                                 alias=cfg.alias, keep_versions=cfg.keep_versions,
                                 batch_size=cfg.upsert_batch, verify_sample=cfg.verify_sample)

    manifest: dict[str, Any] = {
        "collection": result.collection,
        "alias": result.alias,
        "version": result.version,
        "count": result.count,
        "dim": result.dim,
        "verified": result.verified,
        "previous": result.previous,
        "reused": result.reused,
        "pruned": result.pruned,
        "distance": "cosine",
        "model_digest": model_digest(model_dir),
        "qdrant": "server" if os.environ.get("QDRANT_URL") else "local",
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    index_dir.mkdir(parents=True, exist_ok=True)
    _write_vectors(index_dir / "item_vectors.parquet", items["item_id"], vectors)
    _write_atomic(index_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_vectors(path: Path, item_ids: pd.Series, vectors: np.ndarray) -> None:
    # Fixed-size float32 lists keep the file compact and readable as an (n, dim) array.
    table = pa.table({
        "item_id": pa.Array.from_pandas(item_ids.reset_index(drop=True)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
    })
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
