"""Ingested tables for the validation tests: small contract tables written the way ingest writes them."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from datagen import make_contract_dataset


def ingested_tables(out: Path, string_ids: bool = False) -> Path:
    """Contract tables + weight + schema.json, as ingest writes them (timestamps in us, UTC)."""
    make_contract_dataset(out, n_users=40, n_items=30, per_user=(3, 8), string_ids=string_ids,
                          with_logs=True)
    inter = pd.read_parquet(out / "interactions.parquet")
    inter["timestamp"] = inter["timestamp"].astype("datetime64[us, UTC]")
    inter["weight"] = 1.0
    inter.to_parquet(out / "interactions.parquet", index=False)
    logs = pd.read_parquet(out / "ranking_logs.parquet")
    logs["timestamp"] = logs["timestamp"].astype("datetime64[us, UTC]")
    logs.to_parquet(out / "ranking_logs.parquet", index=False)
    dtype = "string" if string_ids else "int64"
    (out / "schema.json").write_text(json.dumps({
        "user_id_dtype": dtype, "item_id_dtype": dtype,
        "user_features": {"categorical": ["age_bucket", "gender", "occupation"], "numeric": [], "multi": []},
        "item_features": {"categorical": ["title"], "numeric": ["year"], "multi": ["genres"]},
        "has_rating": True, "ranking_logs": "source", "source": "test",
    }))
    return out
