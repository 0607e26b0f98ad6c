"""flows/reports/consistency.py: a feature column shuffled across item rows is caught even where its
distribution is unchanged; a catalog that updates some values is not."""
from __future__ import annotations

import numpy as np
import pandas as pd

from flows.reports.consistency import feature_agreement, kappa

KINDS = {"numeric": ["price"], "categorical": ["brand"], "multi": ["tags"]}


def _catalog(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "item_id": [f"i{i}" for i in range(n)],
        "price": np.round(np.exp(rng.normal(2, 1, n)), 2),
        # 90% of items share one brand: raw agreement after a shuffle would still be ~82%
        "brand": rng.choice(["acme", "zen", "kiwi"], n, p=[0.9, 0.05, 0.05]),
        "tags": [sorted(rng.choice(["a", "b", "c", "d", "e"], rng.integers(1, 3), replace=False).tolist())
                 for _ in range(n)],
    })


def test_unchanged_and_updated_catalogs_agree():
    live = _catalog()
    updated = live.copy()
    rng = np.random.default_rng(1)
    moved = rng.random(len(updated)) < 0.3                       # a price update on 30% of items
    updated.loc[moved, "price"] *= rng.uniform(0.9, 1.1, moved.sum())
    renamed = rng.random(len(updated)) < 0.05                    # 5% of items rebranded
    updated.loc[renamed, "brand"] = "zen"
    result = feature_agreement(live, updated, KINDS, KINDS, min_agreement=0.5)
    assert result["inconsistent"] == []
    assert result["columns"]["price"]["agreement"] > 0.99
    assert result["columns"]["price"]["changed_share"] > 0.25
    assert result["columns"]["tags"]["agreement"] == 1.0


def test_each_shuffled_column_is_named_with_its_agreement_near_chance():
    live = _catalog()
    rng = np.random.default_rng(2)
    for column in ("price", "brand", "tags"):
        shuffled = live.assign(**{column: live[column].to_numpy()[rng.permutation(len(live))]})
        result = feature_agreement(live, shuffled, KINDS, KINDS, min_agreement=0.5)
        assert result["inconsistent"] == [column], result
        assert abs(result["columns"][column]["agreement"]) < 0.1


def test_kappa_corrects_for_a_dominant_value():
    old = pd.Series(["a"] * 90 + ["b"] * 10)
    assert kappa(old, old) == 1.0
    assert kappa(old, old.sample(frac=1, random_state=0).reset_index(drop=True)) < 0.3


def test_too_few_common_items_is_skipped_with_the_count():
    live, run = _catalog(100), _catalog(100, seed=5).assign(item_id=lambda d: "new" + d["item_id"])
    result = feature_agreement(live.iloc[:30], pd.concat([run, live.iloc[:30]]), KINDS, KINDS, 0.5)
    assert result["skipped"].startswith("30 items in both catalogs")
