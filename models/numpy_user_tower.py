"""The user tower without torch: its weights as numpy arrays and the same forward pass in numpy.

A one-shot `towerflow recommend` encodes a few users: importing torch (1.1-1.5 s) to run a small MLP
over them cost more than the rest of the answer. Publishing writes the user tower's weights next to
model.pt (`export_user_tower`, model/user_tower.npz in the bundle); the one-shot CLI reads them with
numpy alone. The service and the stages keep the torch model (models/inference.py);
tests/models/test_numpy_user_tower.py holds the two to the same vectors, so a change to
`TwoTower.encode_users` that is not made here fails there. Importing this module imports no torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.encoding import FeatureEncoder

if TYPE_CHECKING:
    from models.towers import TwoTower

USER_TOWER_FILE = "user_tower.npz"
BATCH_USERS = 4096
# F.normalize's floor on the norm: an all-zero output stays zero instead of dividing by zero
NORM_EPS = 1e-12
# The state_dict entries the user tower reads (TwoTower.encode_users); the item tower's are left out.
USER_PARTS = ("item_emb.", "user_cat.", "user_multi.", "user_emb.", "user_tower.")


def export_user_tower(model: "TwoTower", path: Path) -> None:
    """Write the user tower's weights and the model config to `path` (an .npz numpy reads back
    without pickles)."""
    arrays = {name: tensor.detach().cpu().float().numpy() for name, tensor in model.state_dict().items()
              if name.startswith(USER_PARTS)}
    with open(path, "wb") as handle:
        np.savez(handle, config=np.array(json.dumps(model.cfg.to_dict())), **arrays)


def _masked_mean(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """F.embedding_bag(mode="mean", padding_idx=0): the mean of each row's non-zero indices'
    embeddings; an all-padding row gives zeros."""
    keep = (idx != 0)[..., None]                                      # (B, L, 1)
    total = (table[idx] * keep).sum(axis=1)                           # (B, E)
    count = keep.sum(axis=1)                                          # (B, 1)
    return (total / np.maximum(count, 1)).astype(np.float32)


class NumpyUserTower:
    """TwoTower.encode_users in numpy: the same parts, concatenated in the same order, then the
    MLP (ReLU between layers) and the L2 norm."""

    def __init__(self, config: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.config = config
        self.dim: int = int(config["dim"])
        self.item_emb = arrays["item_emb.weight"]
        self.categorical = [arrays[f"user_cat.tables.{j}.weight"] for j in range(len(config["user_categorical"]))]
        self.multi = [(name, arrays[f"user_multi.tables.{j}.weight"]) for j, name in enumerate(config["user_multi"])]
        self.user_emb = arrays["user_emb.weight"] if config["user_id_embedding"] else None
        # nn.Sequential(Linear, ReLU, ..., Linear): the linear layers sit at the even positions
        n_layers = len(config["hidden"]) + 1
        self.layers = [(arrays[f"user_tower.mlp.{2 * i}.weight"], arrays[f"user_tower.mlp.{2 * i}.bias"])
                       for i in range(n_layers)]

    @classmethod
    def load(cls, path: Path) -> "NumpyUserTower":
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
        return cls(json.loads(str(arrays.pop("config"))), arrays)

    def forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        history = batch["history"]                                        # (B, H)
        n_hist = (history != 0).sum(axis=1, keepdims=True)                # (B, 1)
        parts = [_masked_mean(self.item_emb, history),                     # (B, E)
                 np.log1p(n_hist.astype(np.float32)),                      # (B, 1)
                 *(table[batch["cat"][:, j]] for j, table in enumerate(self.categorical)),   # (B, E) each
                 batch["num"].astype(np.float32),                          # (B, Nu)
                 *(_masked_mean(table, batch[f"multi:{name}"]) for name, table in self.multi)]
        if self.user_emb is not None:
            parts.append(self.user_emb[batch["user"]])                    # (B, E)
        x = np.concatenate(parts, axis=1).astype(np.float32)
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS)   # (B, D)


class NumpyUserEncoder:
    """What serving needs of models.inference.TwoTowerBundle to answer users: `dim` and
    `encode_users`, without torch."""

    def __init__(self, tower: NumpyUserTower, encoder: FeatureEncoder):
        self.tower = tower
        self.encoder = encoder
        self.dim = tower.dim

    def encode_users(self, users: pd.DataFrame) -> np.ndarray:
        """(n, dim) float32 L2-normalized, as TwoTowerBundle.encode_users gives them."""
        inputs = self.encoder.encode_users(users)
        n = len(users)
        out = np.zeros((n, self.dim), dtype=np.float32)
        for start in range(0, n, BATCH_USERS):
            out[start:start + BATCH_USERS] = self.tower.forward(
                {k: v[start:start + BATCH_USERS] for k, v in inputs.items()})
        return out


def load_numpy_user_encoder(model_dir: Path) -> NumpyUserEncoder | None:
    """The torch-free user encoder of a published model folder; None when it has no user_tower.npz
    (a bundle published before it was written: the caller loads the torch model instead)."""
    path = Path(model_dir) / USER_TOWER_FILE
    if not path.is_file():
        return None
    return NumpyUserEncoder(NumpyUserTower.load(path), FeatureEncoder.load(Path(model_dir) / "encoder.json"))
