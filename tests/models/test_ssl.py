"""Self-supervised item-tower loss (models/ssl.py): masks, mutual-information groups, InfoNCE."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.losses import info_nce
from models.ssl import ItemAugmenter, build_augmenter, correlated_groups, discretize, feature_units, mutual_information
from models.towers import TwoTower, TwoTowerConfig


def _catalog(n: int = 64) -> dict[str, torch.Tensor]:
    """Items whose cat column 0 copies cat column 1 (fully dependent) while column 2 is independent."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(1, 5, (n,), generator=g)
    return {"item": torch.arange(n), "cat": torch.stack([a, a, torch.randint(1, 5, (n,), generator=g)], 1),
            "num": torch.randn(n, 1, generator=g), "multi:genres": torch.randint(0, 6, (n, 3), generator=g)}


def test_mutual_information_groups_dependent_features():
    cat = _catalog(400)
    units = feature_units(cat)
    assert [(u.key, u.column) for u in units] == [("item", None), ("cat", 0), ("cat", 1), ("cat", 2), ("num", 0),
                                                  ("multi:genres", None)]
    codes = discretize(cat, units)
    mi = mutual_information(codes, np.ones(len(codes)))
    # a copy shares all its information (MI = entropy of the 4 values); an independent column ~none
    assert mi[1, 2] == pytest.approx(mi[1, 1]) and mi[1, 2] > 1.2
    assert mi[1, 3] < 0.1
    # a two-variable table checked by hand: X uniform on {0,1}, Y = X → MI = log 2
    assert mutual_information(np.array([[0, 0], [1, 1]]), np.ones(2))[0, 1] == pytest.approx(math.log(2))
    groups = correlated_groups(mi)
    assert groups.sum(axis=1).tolist() == [3] * 6         # half of the 6 units per group
    assert groups[1, 2] and groups[2, 1]                  # the copies are masked together


@pytest.mark.parametrize("mode", ["random", "correlated"])
def test_views_hide_complementary_feature_sets(mode):
    cat = _catalog()
    aug = build_augmenter(cat, np.ones(len(cat["item"])), mode, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    hide = aug.masks(len(cat["item"]), g)                 # (n, F)
    assert hide.shape == (64, 6) and (hide.sum(dim=1) == 3).all()
    v1, v2 = aug.view(cat, hide, g), aug.view(cat, ~hide, g)
    # every unit is hidden in exactly one view: default (0) there, intact in the other
    for j, u in enumerate(aug.units):
        x1, x2, x = (v[u.key] if u.column is None else v[u.key][:, u.column] for v in (v1, v2, cat))
        h = hide[:, j]
        assert (x1[h] == 0).all() and (x2[~h] == 0).all()
        assert torch.equal(x1[~h], x[~h]) and torch.equal(x2[h], x[h])
    if mode == "correlated":
        # the copied columns 1 and 2 (units cat0, cat1) are always hidden together
        assert torch.equal(hide[:, 1], hide[:, 2])


def test_multi_valued_dropout_drops_values_per_view():
    cat = _catalog()
    aug = ItemAugmenter(feature_units(cat), "random", dropout=0.5)
    v = aug.view(cat, torch.zeros(64, 6, dtype=torch.bool), torch.Generator().manual_seed(0))
    kept = (v["multi:genres"] != 0).sum() / (cat["multi:genres"] != 0).sum()
    assert 0.35 < float(kept) < 0.65


def test_info_nce_matches_hand_computed_value():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert info_nce(z, z, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert info_nce(z, z, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_info_nce_decreases_when_the_item_tower_trains_on_masked_views():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cat = _catalog()
    cfg = TwoTowerConfig(n_items=64, n_users=1, user_categorical=[], user_numeric=1, user_multi={},
                         item_categorical=[5, 5, 5], item_numeric=1, item_multi={"genres": 6},
                         embedding_dim=8, hidden=[16], dim=8)
    model = TwoTower(cfg)
    aug = build_augmenter(cat, np.ones(64), "correlated", dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        v1, v2 = aug.views(cat, g)
        loss = info_nce(model.encode_items(v1), model.encode_items(v2), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


@pytest.mark.parametrize("high,size", [(41, 5), (41, 30)])    # the draw-and-dedupe path, the permutation path
def test_distinct_uniform_draws_every_subset_and_order_alike(high, size):
    from models.ssl import distinct_uniform

    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([distinct_uniform(1, high, size, gen) for _ in range(4000)])    # (4000, size)
    assert draws.min() >= 1 and draws.max() < high
    assert all(len(set(row.tolist())) == size for row in draws)                  # distinct within a draw
    span = high - 1
    for counts in (torch.bincount(draws.flatten(), minlength=high)[1:],           # every value alike
                   torch.bincount(draws[:, 0], minlength=high)[1:]):              # and in every place
        expected = counts.sum().item() / span
        assert (counts.float() - expected).abs().max() < 0.25 * expected + 3 * expected ** 0.5
    with pytest.raises(ValueError, match="cannot draw 41 distinct"):
        distinct_uniform(1, high, 41, gen)
