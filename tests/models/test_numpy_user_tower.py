"""The torch-free user tower (models/numpy_user_tower.py) gives TwoTower.encode_users' vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.numpy_user_tower import NumpyUserTower, export_user_tower
from models.towers import TwoTower, TwoTowerConfig


@pytest.mark.parametrize("user_id_embedding", [False, True], ids=["no_user_ids", "user_ids"])
@pytest.mark.parametrize("hidden", [[16], [16, 12], []], ids=["one_layer", "two_layers", "linear"])
def test_the_numpy_user_tower_gives_the_torch_towers_vectors(tmp_path: Path, user_id_embedding: bool,
                                                            hidden: list[int]) -> None:
    cfg = TwoTowerConfig(n_items=30, n_users=9, user_categorical=[4, 3], user_numeric=2,
                         user_multi={"tags": 6, "langs": 3}, item_categorical=[5], item_numeric=1,
                         item_multi={"genres": 4}, embedding_dim=8, hidden=hidden, dim=6,
                         user_id_embedding=user_id_embedding)
    torch.manual_seed(0)
    model = TwoTower(cfg)
    with torch.no_grad():   # weights of a trained size: the init's 0.02 embeddings would hide a dropped part
        for p in model.parameters():
            p.normal_()
        for table in (model.item_emb, *model.user_multi.tables):
            table.weight[0] = 0        # padding rows stay zero, as training keeps them
    g = torch.Generator().manual_seed(1)
    b = 11
    batch = {"user": torch.randint(0, 9, (b,), generator=g), "history": torch.randint(0, 30, (b, 7), generator=g),
             "cat": torch.stack([torch.randint(0, 4, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)], 1),
             "num": torch.randn(b, 2, generator=g), "multi:tags": torch.randint(0, 6, (b, 3), generator=g),
             "multi:langs": torch.randint(0, 3, (b, 2), generator=g)}
    batch["history"][0] = 0           # a user without history
    batch["history"][1, 3:] = 0       # a short one, padded
    batch["multi:tags"][2] = 0        # no tags
    export_user_tower(model, tmp_path / "user_tower.npz")

    tower = NumpyUserTower.load(tmp_path / "user_tower.npz")
    with torch.no_grad():
        expected = model.encode_users(batch).numpy()
    got = tower.forward({k: v.numpy() for k, v in batch.items()})
    assert got.shape == (b, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # the item tower's own weights are not needed to answer users, and not written
    assert not any(name.startswith(("item_tower.", "item_cat.", "item_multi.")) for name in
                   np.load(tmp_path / "user_tower.npz").files)
