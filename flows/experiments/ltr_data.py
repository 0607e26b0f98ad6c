"""A learning-to-rank-shaped world in the data contract (issue 22 item 4), for `towerflow rank ltr-bench`.

The shape of public web-search LTR data (graded labels 0/1/2, a few dozen numeric document features,
query-level features copied into every document's row as those datasets do), turned into the contract
the rank stage reads: queries are users (users.parquet, with their query features), query-document
pairs are items described only by numeric features (items.parquet), and the ranking log holds
sessions of the logged queries with clicks from the position-based model (flows/sources/click_model.py:
a patient and an impatient user type, (1/position)^η and ^(η · factor)).

A share of the queries (`logged_share`) is logged; the others are held out: their documents appear in
the catalog (features are known) but never in the log, so a ranker scores them from features alone.
The label is a noisy function of the features: a few informative features (some through a threshold,
a square or an interaction with a query feature), the rest noise, many heavy-tailed or binary.

The logger: strength s mixes s · the relevance logit with (1 − s) · its error (click_model.ranker_scores);
its error is redrawn per session (`persistent` false: with s = 0 a random order) or fixed per document
(a production ranker that repeats its mistakes: the confounded case).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flows.params import SimulatorParams
from flows.sources.click_model import examination, ranker_scores

GRADES = 3                       # labels 0, 1, 2
EPSILON = 0.1                    # P(relevant | label 0): clicks on irrelevant documents happen


@dataclass(frozen=True)
class LtrShape:
    queries: int = 600
    docs_min: int = 15               # documents per query, uniform in [docs_min, docs_max]
    docs_max: int = 40
    features: int = 40               # numeric document features
    informative: int = 10            # of them, the ones the label depends on
    query_features: int = 4          # per query; copied into each of its documents' rows
    sessions: int = 10               # logged sessions (requests) per logged query
    logged_share: float = 0.7        # queries in the log; the rest are held out
    eta: float = 2.0                 # position bias: patient users (1/position)^η
    impatient_share: float = 0.5
    impatient_factor: float = 3.0    # impatient users: (1/position)^(η · factor)
    label_noise: float = 0.5         # std of the noise in the latent label score (its signal has std ~1)
    label_shares: tuple[float, float] = (0.6, 0.3)   # shares of labels 0 and 1 (2: the rest)


@dataclass(frozen=True)
class Logger:
    strength: float = 0.0            # what the logger knew about relevance: 0 random, 1 the true order
    persistent: bool = False         # its error fixed per document (confounding) or redrawn per session

    @property
    def name(self) -> str:
        return "random" if self.strength == 0 and not self.persistent else \
            f"strength {self.strength:g}, {'persistent' if self.persistent else 'redrawn'} errors"


@dataclass
class LtrWorld:
    docs: pd.DataFrame               # item_id, query (user_id), label, f0.. (document), q0.. (query copies)
    queries: pd.DataFrame            # user_id, q0.., logged (bool)
    p_relevant: np.ndarray           # (D,) P(relevant | label) per document row

    @property
    def held_out(self) -> pd.DataFrame:
        """item_id, user_id, label of the held-out queries' documents."""
        logged = set(self.queries.loc[self.queries["logged"], "user_id"])
        d = self.docs[~self.docs["user_id"].isin(logged)]
        return d[["user_id", "item_id", "label"]].reset_index(drop=True)


def _heavy(x: np.ndarray, kind: int) -> np.ndarray:
    """A Gaussian column reshaped as real LTR features are: raw, a heavy-tailed count (BM25-like),
    a binary flag, or a skewed positive score. Monotone, so the information is kept."""
    if kind == 0:
        return x
    if kind == 1:
        return np.floor(np.expm1(np.abs(x) * 1.5) * 3.0) * np.sign(x)
    if kind == 2:
        return (x > 0.5).astype(np.float64)
    return np.exp(x)


def generate(shape: LtrShape, seed: int) -> LtrWorld:
    rng = np.random.default_rng([seed, 0x17_72])
    n_docs = rng.integers(shape.docs_min, shape.docs_max + 1, size=shape.queries)     # (Q,)
    query = np.repeat(np.arange(shape.queries), n_docs)                                # (D,)
    q = rng.standard_normal((shape.queries, shape.query_features))                    # (Q, Fq)
    # documents of one query share a query-level offset: labels are denser in some queries than others
    x = rng.standard_normal((len(query), shape.features)) + 0.5 * rng.standard_normal((shape.queries, 1))[query]
    k = min(shape.informative, shape.features)
    w = rng.uniform(0.5, 1.0, size=k) * rng.choice([-1.0, 1.0], size=k)
    latent = x[:, :k] @ w / np.sqrt((w ** 2).sum())                                   # (D,) std ~1
    if k >= 4:      # non-linear parts a linear model misses: a threshold, a square, a query interaction
        latent += 0.6 * (x[:, 0] > 1.0) - 0.4 * (x[:, 1] ** 2 - 1.0) + 0.5 * q[query, 0] * x[:, 2]
    latent = latent / latent.std() + shape.label_noise * rng.standard_normal(len(query))
    cuts = np.quantile(latent, np.cumsum(shape.label_shares))
    label = np.searchsorted(cuts, latent).astype(np.int64)                            # 0, 1, 2
    kinds = rng.integers(0, 4, size=shape.features)
    docs = pd.DataFrame({f"f{j}": _heavy(x[:, j], int(kinds[j])) for j in range(shape.features)})
    for j in range(shape.query_features):
        docs[f"q{j}"] = q[query, j]
    user_ids = np.array([f"q{i:05d}" for i in range(shape.queries)])
    docs.insert(0, "label", label)
    docs.insert(0, "user_id", user_ids[query])
    docs.insert(0, "item_id", np.arange(len(query), dtype=np.int64))
    logged = rng.random(shape.queries) < shape.logged_share
    queries = pd.DataFrame({"user_id": user_ids, **{f"q{j}": q[:, j] for j in range(shape.query_features)},
                            "logged": logged})
    p_rel = EPSILON + (1 - EPSILON) * (2.0 ** label - 1) / (2.0 ** (GRADES - 1) - 1)
    return LtrWorld(docs, queries, p_rel)


def click_log(world: LtrWorld, shape: LtrShape, logger: Logger, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ranking log in the contract's form, truth rows) for `sessions` sessions of every logged query:
    the logger orders the query's documents, every one is shown, a user type examines by position."""
    rng = np.random.default_rng([seed, 0x10_66])
    docs = world.docs[world.docs["user_id"].isin(world.queries.loc[world.queries["logged"], "user_id"])]
    logit = np.log(world.p_relevant / (1 - world.p_relevant + 1e-9))
    error = rng.standard_normal(len(world.docs))                       # the logger's persistent part
    sim = SimulatorParams(logging_strength=logger.strength)
    curves = examination(shape.docs_max, shape.eta, shape.impatient_factor)
    item_ids = world.docs["item_id"].to_numpy()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("request", "user", "item", "position", "clicked",
                                                         "impatient", "p")}
    request = 0
    for user, group in docs.groupby("user_id", sort=True):
        rows = group.index.to_numpy()
        for _ in range(shape.sessions):
            noise = error[rows] if logger.persistent else rng.standard_normal(len(rows))
            score = ranker_scores(logit[rows], np.ones(len(rows), bool), noise, sim)
            order = rows[np.argsort(-score, kind="stable")]
            impatient = bool(rng.random() < shape.impatient_share)
            curve = curves["impatient" if impatient else "patient"][: len(order)]
            n = len(order)
            cols["request"].append(np.full(n, request))
            cols["user"].append(np.full(n, user, dtype=object))
            cols["item"].append(item_ids[order])
            cols["position"].append(np.arange(1, n + 1, dtype=np.int64))
            cols["clicked"].append(rng.random(n) < curve * world.p_relevant[order])
            cols["impatient"].append(np.full(n, impatient))
            cols["p"].append(world.p_relevant[order])
            request += 1
    c = {k: np.concatenate(v) for k, v in cols.items()}
    rid = np.char.add("r", np.char.zfill(c["request"].astype(str), 7)).astype(object)
    logs = pd.DataFrame({"request_id": rid, "user_id": c["user"], "item_id": c["item"], "stage": "shown",
                         "position": c["position"], "clicked": c["clicked"]})
    truth = pd.DataFrame({"request_id": rid, "item_id": c["item"],
                          "user_type": np.where(c["impatient"], "impatient", "patient"), "p_relevant": c["p"]})
    return logs, truth


def write_ingested(world: LtrWorld, shape: LtrShape, logger: Logger, seed: int, out: Path) -> Path:
    """The world as ingest writes a simulated source: ranking_logs, items, users, schema.json and the
    truth in simulation/ (truth.parquet, truth.json with each user type's examination curve)."""
    (out / "simulation").mkdir(parents=True, exist_ok=True)
    logs, truth = click_log(world, shape, logger, seed)
    logs.to_parquet(out / "ranking_logs.parquet", index=False, row_group_size=50_000)
    truth.to_parquet(out / "simulation" / "truth.parquet", index=False)
    numeric = [c for c in world.docs.columns if c not in ("item_id", "user_id", "label")]
    world.docs[["item_id", *numeric]].to_parquet(out / "items.parquet", index=False)
    query_cols = [c for c in world.queries.columns if c.startswith("q")]
    world.queries[["user_id", *query_cols]].to_parquet(out / "users.parquet", index=False)
    curves = examination(shape.docs_max, shape.eta, shape.impatient_factor)
    (out / "simulation" / "truth.json").write_text(json.dumps(
        {"propensity": {k: v.tolist() for k, v in curves.items()}, "ltr_shape": asdict(shape),
         "logger": asdict(logger)}))
    (out / "schema.json").write_text(json.dumps({
        "user_id_dtype": "string", "item_id_dtype": "int64", "ranking_logs": "simulated", "log_context": [],
        "user_features": {"categorical": [], "numeric": query_cols, "multi": []},
        "item_features": {"categorical": [], "numeric": numeric, "multi": []}}))
    return out
