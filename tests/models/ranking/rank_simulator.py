"""A tiny click simulator for the ranking tests, with its ground truth.

True relevance of (user, item) comes from latent factors: P(relevant) = σ(scale · u·v/√d + bias).
A logging ranker orders each request's candidates; its score mixes the true relevance logit with a
fixed error model of its own (strength 0: it knows nothing about relevance, but, like any trained model,
ranks the same pair the same way every time; 1: it ranks by true relevance), plus a little per-request
jitter. The user examines position p with probability (1/p)^eta of the user's type (two types), and
clicks when the item is examined and relevant. Rows that were retrieved but not shown are logged too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.ranking.catalog import RankFeatures, build_features
from models.ranking.data import LogSpec, RankBatch, RankingLog, inspect_log
from models.ranking.params import RankParams
from models.ranking.config import RankerConfig


@dataclass(frozen=True)
class SimConfig:
    n_users: int = 100
    n_items: int = 120
    dim: int = 6
    requests: int = 3000
    list_len: tuple[int, int] = (8, 16)      # shown items per request: positions beyond 10 too
    unshown: int = 3                         # retrieved-but-not-shown rows per request
    etas: tuple[float, float] = (2.0, 2.0)   # examination (1/position)^eta of user types 0 and 1
    logging_strength: float = 0.0
    request_noise: float = 0.2               # per-request jitter of the logger's scores
    rel_scale: float = 2.5
    rel_bias: float = -0.5
    feature_noise: float = 0.3               # noise of the items' numeric features around their factors
    vectors: bool = False                    # also give retrieval vectors (noisy factors) of both sides
    devices: bool = False                    # a per-request context column `device`
    grid_cols: int = 0                       # > 0: a grid layout with this many columns (row, col)
    neighbour: float = 0.0                   # > 0: relevant neighbours (p ± 1) draw examination away
    seed: int = 0


@dataclass
class SimLog:
    logs: pd.DataFrame
    items: pd.DataFrame                      # item_id + numeric features (noisy latent factors)
    curves: dict[int, np.ndarray]            # user type → true examination at positions 1..max
    user_vectors: tuple[np.ndarray, np.ndarray] | None = None
    item_vectors: tuple[np.ndarray, np.ndarray] | None = None
    truth: dict[str, float] = field(default_factory=dict)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / "ranking_logs.parquet"
        self.logs.to_parquet(path, index=False, row_group_size=5000)
        return path


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate(cfg: SimConfig) -> SimLog:
    rng = np.random.default_rng(cfg.seed)
    d = cfg.dim
    U, V = rng.normal(size=(cfg.n_users, d)), rng.normal(size=(cfg.n_items, d))
    EU, EV = rng.normal(size=(cfg.n_users, d)), rng.normal(size=(cfg.n_items, d))
    z_true = U @ V.T / np.sqrt(d)                                            # (nu, ni)
    z_err = EU @ EV.T / np.sqrt(d)                                           # the logger's own error
    p_rel = _sigmoid(cfg.rel_scale * z_true + cfg.rel_bias)                  # (nu, ni)
    s = cfg.logging_strength
    logger = s * z_true + np.sqrt(1 - s * s) * z_err                         # (nu, ni)
    user_type = (rng.random(cfg.n_users) < 0.5).astype(int)                  # (nu,)
    max_len = cfg.list_len[1]
    pos = np.arange(1, max_len + 1)
    curves = {t: (1.0 / pos) ** eta for t, eta in enumerate(cfg.etas)}

    rows = []
    for r in range(cfg.requests):
        u = int(rng.integers(cfg.n_users))
        n = int(rng.integers(cfg.list_len[0], cfg.list_len[1] + 1))
        cand = rng.choice(cfg.n_items, n + cfg.unshown, replace=False)
        score = logger[u, cand] + cfg.request_noise * rng.normal(size=len(cand))
        cand, score = cand[np.argsort(-score)], np.sort(score)[::-1]
        device = "mobile" if rng.random() < 0.5 else "desktop"
        # mobile users examine a little less everywhere: the same curve once normalized at the top
        exam = curves[user_type[u]][:n] * (0.8 if cfg.devices and device == "mobile" else 1.0)
        rel = p_rel[u, cand[:n]]
        if cfg.neighbour:   # the independence assumption broken: what surrounds an item matters
            around = (np.r_[0.0, rel[:-1]] + np.r_[rel[1:], 0.0]) / 2
            exam = exam * np.exp(-cfg.neighbour * around)
        clicked = (rng.random(n) < exam) & (rng.random(n) < rel)
        for j, item in enumerate(cand):
            shown = j < n
            rows.append((f"r{r:06d}", f"u{u}", int(item), j + 1 if shown else None, shown,
                         bool(shown and clicked[j]), float(score[j]), float(p_rel[u, item]),
                         int(user_type[u]), float(exam[j]) if shown else np.nan, device))
    logs = pd.DataFrame(rows, columns=["request_id", "user_id", "item_id", "position", "shown",
                                       "clicked", "ranker_score", "relevance", "user_type",
                                       "p_examine", "device"])
    logs["position"] = logs["position"].astype("Int64")
    if not cfg.devices:
        logs = logs.drop(columns="device")
    if cfg.grid_cols:
        p0 = logs["position"] - 1
        logs["grid_row"], logs["grid_col"] = p0 // cfg.grid_cols, p0 % cfg.grid_cols
    feats = V + cfg.feature_noise * rng.normal(size=V.shape)
    items = pd.DataFrame(feats, columns=[f"f{j}" for j in range(d)])
    items.insert(0, "item_id", np.arange(cfg.n_items))
    sim = SimLog(logs=logs, items=items, curves=curves,
                 truth={"click_rate": float(logs.loc[logs.shown, "clicked"].mean())})
    if cfg.vectors:
        noise = cfg.feature_noise
        sim.user_vectors = (np.array([f"u{u}" for u in range(cfg.n_users)]),
                            U + noise * rng.normal(size=U.shape))
        sim.item_vectors = (np.arange(cfg.n_items), V + noise * rng.normal(size=V.shape))
    return sim


def read_split(sim: SimLog, directory: Path, params: RankParams,
               truth: tuple[str, ...] = ("relevance", "user_type")) -> Split:
    """Write the log, build the features and read both sides of the held-out split into memory."""
    path = sim.write(directory)
    features = build_features(path, params.context_columns, item_table=sim.items,
                              user_vectors=sim.user_vectors, item_vectors=sim.item_vectors)
    spec = inspect_log(path, context=params.context_columns, truth=truth)
    kw = dict(batch_requests=params.batch_requests, read_rows=params.read_rows,
              max_position=params.max_position, max_grid=params.max_grid,
              test_fraction=params.test_fraction)
    return Split(path=path, features=features, spec=spec,
                 train=list(RankingLog(path, features, spec, split="train", **kw)),
                 test=list(RankingLog(path, features, spec, split="test", **kw)),
                 config=RankerConfig.build(params, features, spec.grid))


@dataclass
class Split:
    path: Path
    features: RankFeatures
    spec: LogSpec
    train: list[RankBatch]
    test: list[RankBatch]
    config: RankerConfig


def hold_out_items(sim: SimLog, share: float, test_fraction: float) -> np.ndarray:
    """Drop the last `share` of the items from every training request of the log (the split is the
    one RankingLog makes), so they are seen only in held-out requests: new items. Returns their ids."""
    from models.ranking.data import _held_out

    held = np.arange(int(round(len(sim.items) * (1 - share))), len(sim.items))
    logs = sim.logs
    test = _held_out(logs["request_id"].to_numpy(), test_fraction)
    sim.logs = logs[test | ~logs["item_id"].isin(held)].reset_index(drop=True)
    return held
