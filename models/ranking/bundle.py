"""The served ranker on disk: one model's weights, its config and the id maps, and scoring raw pairs.

Serving reads the relevance tower alone (no position): `RankerBundle.score(user_ids, item_ids)`.
The feature tables (numeric item features, retrieval embeddings) are buffers of the model, so they
travel inside model.pt and a served score never depends on files the ranker did not save.

Layout of a ranker directory:
  model.pt       state_dict of the whole model (the dot-product models score against the bias tower's
                 "unknown position" vector, so the bias tower is kept too), or of a seed ensemble's
                 members (ranker.json "members": their count; models/ranking/ensemble.py); for LightGBM lambdarank
                 (models/ranking/lambdarank.py) model.txt (the booster) and tables.npz (its features)
  ranker.json    {"model": name, "config": RankerConfig, "seed": ..., plus what the caller records}
  users.parquet  id: user ids in vocabulary order (index = row + 1; 0 is OOV)
  items.parquet  id: item ids, the same way
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.errors import ModelNotFound, NoRankerTrained
from models.ranking import lambdarank
from models.ranking.catalog import RankFeatures, Vocab
from models.ranking.data import RankingInputError
from models.ranking.ensemble import SeedEnsemble
from models.ranking.lambdarank import LambdaRanker
from models.ranking.config import RankerConfig
from models.ranking.ranker import Ranker
from models.ranking.train import build_model

ID_FILES = ("ranker.json", "users.parquet", "items.parquet")
FILES = ("model.pt", *ID_FILES)                                  # a network's directory
LAMBDARANK_FILES = (lambdarank.BOOSTER, lambdarank.TABLES_FILE, *ID_FILES)
Servable = Ranker | LambdaRanker | SeedEnsemble


def save_ranker(out_dir: Path, name: str, model: Servable, features: RankFeatures, seed: int,
                extra: dict[str, Any] | None = None) -> None:
    """Write the ranker directory (files above); `extra` is merged into ranker.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, LambdaRanker):
        model.save(out_dir)
        doc = {"model": lambdarank.NAME, "position": model.position, "train_rows": model.train_rows,
               "seed": seed, "item_numeric": features.numeric_names}
    else:
        torch.save(model.state_dict(), out_dir / "model.pt")
        doc = {"model": name, "config": model.cfg.to_dict(), "seed": seed,
               "members": len(model.members) if isinstance(model, SeedEnsemble) else 1}
    pd.DataFrame({"id": features.users.index.to_numpy()}).to_parquet(out_dir / "users.parquet", index=False)
    pd.DataFrame({"id": features.items.index.to_numpy()}).to_parquet(out_dir / "items.parquet", index=False)
    (out_dir / "ranker.json").write_text(json.dumps(doc | (extra or {}), indent=2) + "\n")


class RankerBundle:
    """A loaded ranker: raw (user_id, item_id) pairs → relevance scores. Unknown ids score from the
    OOV row (whatever features they have: none), like a cold-start user or item."""

    def __init__(self, name: str, model: Servable, users: Vocab, items: Vocab, meta: dict[str, Any],
                 batch_size: int = 65536):
        self.name, self.model, self.users, self.items, self.meta = name, model.eval(), users, items, meta
        self.batch_size = batch_size

    def score(self, user_ids: np.ndarray | list, item_ids: np.ndarray | list) -> np.ndarray:
        """(N,) float32 relevance scores, higher is better; the two id lists are aligned."""
        u = self.users.lookup(np.asarray(user_ids))                          # (N,)
        i = self.items.lookup(np.asarray(item_ids))                          # (N,)
        if len(u) != len(i):
            raise ValueError(f"user_ids and item_ids must align (got {len(u)} and {len(i)})")
        out = np.empty(len(u), np.float32)
        with torch.no_grad():
            for lo in range(0, len(u), self.batch_size):
                hi = lo + self.batch_size
                out[lo:hi] = self.model.score(torch.from_numpy(u[lo:hi]), torch.from_numpy(i[lo:hi])).numpy()
        return out


def _ids(path: Path) -> np.ndarray:
    return pd.read_parquet(path)["id"].to_numpy()


def load_ranker(model_dir: Path) -> RankerBundle:
    """Load a directory written by save_ranker; raises ModelNotFound naming a missing file."""
    doc = model_dir / "ranker.json"
    skipped = json.loads(doc.read_text()).get("skipped") if doc.is_file() else None
    if skipped:
        raise NoRankerTrained(f"{model_dir}: no ranker was trained ({skipped})")
    meta = json.loads(doc.read_text()) if doc.is_file() else {}
    gbm = meta.get("model") == lambdarank.NAME
    for name in LAMBDARANK_FILES if gbm else FILES:
        if not (model_dir / name).is_file():
            raise ModelNotFound(f"{model_dir / name}: not found (no ranker saved in {model_dir})")
    users, items = Vocab(_ids(model_dir / "users.parquet")), Vocab(_ids(model_dir / "items.parquet"))
    model: Servable
    if gbm:
        try:
            model = LambdaRanker.load(model_dir, position=bool(meta.get("position", True)))
        except RankingInputError as exc:   # LightGBM not installed, or a booster of another save
            raise ModelNotFound(f"{model_dir}: {exc}") from exc
        shape = (len(model.tables["user_vectors"]), len(model.tables["item_numeric"]))
    else:
        cfg = RankerConfig(**meta["config"])
        members = [build_model(meta["model"], cfg, None, seed=int(meta.get("seed", 0)))
                   for _ in range(int(meta.get("members", 1)))]
        model = members[0] if len(members) == 1 else SeedEnsemble(members)
        model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
        shape = (cfg.n_users, cfg.n_items)
    if (len(users), len(items)) != shape:
        raise ModelNotFound(f"{model_dir}: id maps ({len(users)}, {len(items)}) do not match the model "
                            f"{shape}; the directory mixes two saves")
    return RankerBundle(meta["model"], model, users, items, meta)
