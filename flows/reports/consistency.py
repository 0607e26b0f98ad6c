"""Do the items the live model knows still carry the features it was trained with?

Drift compares distributions, so a feature column shuffled across item rows (a broken join, an export
that sorted one column on its own) keeps every marginal and passes any drift test, while every item
now describes another one. What does catch it is the item itself: for the items in both this run's
catalog and the live bundle's (`items.parquet`), each feature column's agreement beyond chance:

- numeric: Spearman's rank correlation of the old and new values (a price update keeps the order
  of most items; a shuffle leaves none: about 0);
- categorical and multi-valued (as the sorted set): Cohen's kappa, the share of items whose value
  is unchanged corrected for the agreement two shuffled copies would show by chance (so a column where
  90% of items share one value does not look consistent after a shuffle: it scores about 0 too).

A column scores 1.0 when every common item keeps its value. Columns that are constant on both sides
score 1.0 as well (there is nothing to disagree on).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

KINDS = ("numeric", "categorical", "multi")


def _key(values: pd.Series, kind: str) -> pd.Series:
    if kind == "multi":
        return values.map(lambda v: "|".join(sorted(map(str, v))) if isinstance(v, (list, tuple, np.ndarray))
                          else "<missing>")
    return values.astype(object).where(values.notna(), "<missing>").astype(str)


def kappa(old: pd.Series, new: pd.Series) -> float:
    """Cohen's kappa of two labelings of the same items (1: identical, 0: chance)."""
    observed = float((old.to_numpy() == new.to_numpy()).mean())
    p, q = old.value_counts(normalize=True), new.value_counts(normalize=True)
    expected = float((p * q.reindex(p.index, fill_value=0.0)).sum())
    return 1.0 if expected >= 1.0 else (observed - expected) / (1.0 - expected)


def rank_correlation(old: pd.Series, new: pd.Series) -> float:
    both = pd.DataFrame({"old": pd.to_numeric(old, errors="coerce"),
                         "new": pd.to_numeric(new, errors="coerce")}).dropna()
    if len(both) < 2 or both["old"].nunique() < 2 or both["new"].nunique() < 2:
        # constant on a side: agreement is whether the values are the same
        return float((both["old"] == both["new"]).mean()) if len(both) else 1.0
    return float(both["old"].rank().corr(both["new"].rank()))


def feature_agreement(live_items: pd.DataFrame, items: pd.DataFrame, live_kinds: dict[str, list[str]],
                      kinds: dict[str, list[str]], min_agreement: float | None,
                      min_common: int = 50) -> dict[str, Any]:
    """Per item feature column in both catalogs (with the same kind): agreement beyond chance over
    the common items. Columns below min_agreement are listed under "inconsistent"."""
    common = live_items.drop_duplicates("item_id").merge(items.drop_duplicates("item_id"), on="item_id",
                                                        suffixes=("_live", "_run"))
    out: dict[str, Any] = {"common_items": len(common), "min_agreement": min_agreement, "columns": {}}
    if len(common) < min_common:
        return {**out, "skipped": f"{len(common)} items in both catalogs (fewer than {min_common})"}
    for kind in KINDS:
        both = set(live_kinds.get(kind, [])) & set(kinds.get(kind, [])) & set(live_items) & set(items)
        for col in sorted(both - {"item_id"}):
            old, new = common[f"{col}_live"], common[f"{col}_run"]
            score = rank_correlation(old, new) if kind == "numeric" else kappa(_key(old, kind), _key(new, kind))
            changed = float((_key(old, kind).to_numpy() != _key(new, kind).to_numpy()).mean())
            out["columns"][col] = {"kind": kind, "agreement": round(score, 4), "changed_share": round(changed, 4)}
    out["inconsistent"] = sorted(c for c, v in out["columns"].items()
                                 if min_agreement is not None and v["agreement"] < min_agreement)
    return out
