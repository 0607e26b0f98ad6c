"""LightGBM lambdarank as a servable ranker, beside the networks (issue 22).

The ranker a team would otherwise pick: gradient-boosted trees with the lambdarank objective, trained
on the clicks of the shown impressions. With `position` (lgb.Dataset's position field, LightGBM >= 4.1)
it learns a position-bias correction beside the ranker (the unbiased LambdaMART of Hu et al. 2019);
without it, the naive one. It reads what the relevance tower's feature path reads (the scaled numeric
item features, the retrieval towers' user and item vectors, their product and dot product when they
share a size) and never an id, a context column or the logged score: serving knows none of those
for a new item or a new user, so a served score never depends on them.

It answers the networks' serving interface (`eval`, `score` of index pairs, `ranking_scores` of a
batch), so `rank.serve: auto` validates it like the others and RankerBundle scores raw ids with it.
On disk (a ranker directory, models/ranking/bundle.py): model.txt (the booster), tables.npz (the
feature tables, indexed by vocabulary index) beside ranker.json and the id maps.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.ranking.data import RankBatch, RankingInputError

NAME = "lightgbm"
BOOSTER, TABLES_FILE = "model.txt", "tables.npz"
TABLES = ("item_numeric", "user_vectors", "item_vectors")
MAX_GRADES = 31                 # lambdarank's default label_gain covers grades 0..30


def _lgb() -> Any:
    try:
        import lightgbm as lgb
    except ImportError as exc:  # optional: the networks do not need it
        raise RankingInputError("the LightGBM ranker needs `pip install 'lightgbm>=4.1,<5'`") from exc
    return lgb


def feature_rows(user: np.ndarray, item: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
    """(N, F) float32 features of (user, item) index pairs: numeric item features, both retrieval
    vectors, and their product and dot product when they share a size. Index 0 (OOV) reads zeros.
    float32 as the tables are (LightGBM reads each value as a double, so the model is the same):
    2M training rows of 195 features are 1.6 GB, where float64 held 3.1 GB."""
    uv, iv = tables["user_vectors"][user], tables["item_vectors"][item]        # (N, Du), (N, Di)
    cols = [tables["item_numeric"][item], uv, iv]
    if uv.shape[1] == iv.shape[1] > 0:
        cols += [uv * iv, (uv * iv).sum(axis=1, keepdims=True)]
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in cols], axis=1)


def n_features(tables: dict[str, np.ndarray]) -> int:
    return feature_rows(np.zeros(1, np.int64), np.zeros(1, np.int64), tables).shape[1]


def _grades(values: np.ndarray) -> np.ndarray:
    """Truth values → dense integer grades 0, 1, ... in their order (lambdarank's labels)."""
    levels, grades = np.unique(values, return_inverse=True)
    if len(levels) > MAX_GRADES:
        raise RankingInputError(f"a label-trained LightGBM needs graded truth (at most {MAX_GRADES} levels); "
                                f"the truth column has {len(levels)} distinct values")
    return grades.astype(np.int32)


class LambdaRanker:
    """A trained booster and the feature tables it reads: the networks' serving interface."""

    name = NAME

    def __init__(self, booster: Any, tables: dict[str, np.ndarray], position: bool, train_rows: int = 0):
        self.booster, self.tables, self.position, self.train_rows = booster, tables, position, train_rows

    def eval(self) -> LambdaRanker:
        return self            # no training mode: here so that callers treat it like a network

    def predict(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        if len(user) == 0:
            return np.zeros(0)
        return self.booster.predict(feature_rows(user, item, self.tables))

    def score(self, users: torch.Tensor, items: torch.Tensor,
              logged_score: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) serving scores of (user, item) index pairs."""
        return torch.from_numpy(self.predict(users.numpy(), items.numpy()).astype(np.float32))

    def ranking_scores(self, batch: RankBatch) -> torch.Tensor:
        """(R, L) scores of the batch's impressions (padding scores 0; every caller masks it)."""
        m = batch.mask.numpy()
        user = np.broadcast_to(batch.user.numpy()[:, None], m.shape)[m]
        out = torch.zeros(m.shape, dtype=torch.float32)
        out[batch.mask] = torch.from_numpy(self.predict(user, batch.item.numpy()[m]).astype(np.float32))
        return out

    def save(self, out_dir: Path) -> None:
        self.booster.save_model(str(out_dir / BOOSTER))
        np.savez(out_dir / TABLES_FILE, **self.tables)

    @classmethod
    def load(cls, model_dir: Path, position: bool) -> LambdaRanker:
        lgb = _lgb()
        booster = lgb.Booster(model_file=str(model_dir / BOOSTER))
        with np.load(model_dir / TABLES_FILE) as z:
            tables = {name: z[name] for name in TABLES}
        if booster.num_feature() != n_features(tables):
            raise RankingInputError(f"{model_dir}: the booster reads {booster.num_feature()} features but the "
                                    f"tables give {n_features(tables)}; the directory mixes two saves")
        return cls(booster, tables, position)


def fit_lambdarank(train: Iterable[RankBatch], tables: dict[str, np.ndarray], *, position: bool = True,
                   label: str | None = None, rounds: int = 100, max_rows: int = 500_000, seed: int = 0,
                   threads: int = 1) -> LambdaRanker:
    """LightGBM lambdarank on the shown impressions of `train` (at most `max_rows`, whole batches: its
    matrix is in memory). label None: the clicks; else a truth column of the batches, read as graded
    relevance (the model trained on the true labels, a ceiling). position: LightGBM's position-bias
    correction (the logged position as Dataset `position`)."""
    return fit_lambdarank_variants(train, tables, (position,), label=label, rounds=rounds, max_rows=max_rows,
                                   seed=seed, threads=threads)[0]


def fit_lambdarank_variants(train: Iterable[RankBatch], tables: dict[str, np.ndarray], positions: Sequence[bool], *,
                            label: str | None = None, rounds: int = 100, max_rows: int = 500_000, seed: int = 0,
                            threads: int = 1) -> list[LambdaRanker]:
    """fit_lambdarank for each of `positions` (with the position correction or without) on one binned
    Dataset: the training matrix is read from the log and binned once (on the 700k bench shape's
    500k x 195 matrix, ~10 s of each fit), the models are the ones separate Datasets give, tree for tree.
    The model without the correction trains first: a Dataset's position can be set after binning, not
    taken away."""
    lgb = _lgb()
    if n_features(tables) == 0:
        raise RankingInputError("the LightGBM ranker reads item/user features and no ids: this catalog has "
                                "no numeric item features and no retrieval embeddings")
    users, items, ys, pos, groups, n = [], [], [], [], [], 0
    for batch in train:
        m = batch.mask.numpy()
        users.append(np.broadcast_to(batch.user.numpy()[:, None], m.shape)[m])
        items.append(batch.item.numpy()[m])
        ys.append((batch.clicked if label is None else batch.truth[label]).numpy()[m])
        pos.append(batch.position.numpy()[m] - 1)                              # 0-based position ids
        groups.append(m.sum(axis=1)[m.any(axis=1)])
        n += int(m.sum())
        if n >= max_rows:
            break
    if n == 0:
        raise RankingInputError("the LightGBM ranker has no training impressions")
    y = np.concatenate(ys)
    y = y.astype(np.int32) if label is None else _grades(np.nan_to_num(y, nan=0.0))
    data = lgb.Dataset(feature_rows(np.concatenate(users), np.concatenate(items), tables), y,
                       group=np.concatenate(groups))
    params = {"objective": "lambdarank", "learning_rate": 0.05, "num_leaves": 31, "verbose": -1,
              "seed": seed, "deterministic": True, "num_threads": threads, "force_row_wise": True}
    boosters: dict[bool, Any] = {}
    for with_position in sorted(set(positions)):                              # False (no correction) first
        if with_position:
            data.set_position(np.concatenate(pos).astype(np.int32))
        boosters[with_position] = lgb.train(params, data, num_boost_round=rounds)
    return [LambdaRanker(boosters[p], tables, p, n) for p in positions]
