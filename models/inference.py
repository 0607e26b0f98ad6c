"""Load a trained two-tower model and turn raw user / item rows into embeddings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.checkpoint import load_model
from models.encoding import FeatureEncoder
from models.towers import TwoTower


class TwoTowerBundle:
    """A trained TwoTower with the encoder it was trained with. Unknown ids, feature values or
    missing columns fall back to OOV / mean values, so new users and items still get vectors."""

    def __init__(self, model: TwoTower, encoder: FeatureEncoder, batch_size: int = 4096,
                 device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.encoder = encoder
        self.batch_size = batch_size
        self.dim: int = model.cfg.dim

    def _run(self, inputs: dict[str, np.ndarray], tower) -> np.ndarray:
        n = len(next(iter(inputs.values())))
        out = np.zeros((n, self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                batch = {k: torch.from_numpy(np.ascontiguousarray(v[start:start + self.batch_size])).to(self.device)
                         for k, v in inputs.items()}
                out[start:start + self.batch_size] = tower(batch).float().cpu().numpy()   # (b, D)
        return out

    def encode_items(self, items: pd.DataFrame) -> np.ndarray:
        """(n, dim) float32 L2-normalized, rows aligned with `items` (item_id + item feature columns)."""
        return self._run(self.encoder.encode_items(items), self.model.encode_items)

    def encode_users(self, users: pd.DataFrame) -> np.ndarray:
        """(n, dim) float32 L2-normalized from user_id, user feature columns and recent_items
        (item ids, newest first; empty or missing is allowed)."""
        return self._run(self.encoder.encode_users(users), self.model.encode_users)


def load_bundle(model_dir: Path, device: torch.device | None = None) -> TwoTowerBundle:
    """Load model_dir/model.pt + encoder.json (model_dir = artifacts/model/eval or .../full), encoding on
    `device` (default the CPU); raises models.errors.ModelNotFound when either file is missing."""
    model, encoder = load_model(model_dir)
    return TwoTowerBundle(model, encoder, device=device)
