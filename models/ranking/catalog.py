"""What the towers know about users and items: id vocabularies and optional feature tables.

Every table is indexed by vocabulary index; row 0 is the OOV/padding row and stays zero, so a user or
item never seen in the logs is scored from whatever features it has (none: the all-zero row). Users
need no feature columns at all and items may carry only numeric features (web-search LTR data); the
retrieval towers' embeddings can be passed in as plain arrays.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.special import ndtri

from models.arrays import sorted_unique
from models.parquet_stream import open_stream
from models.ranking.data import RankingInputError, require_columns

Vectors = tuple[np.ndarray, np.ndarray]   # (ids (N,), vectors (N, D)) from the retrieval towers
KNOTS = 1001                              # quantile scaling: 0.1% resolution


class Vocab:
    """Raw ids (any sortable type) → indices 1..n; 0 is OOV and padding."""

    def __init__(self, ids: np.ndarray):
        self.index = pd.Index(sorted_unique(ids))

    def __len__(self) -> int:
        return len(self.index) + 1

    def lookup(self, values: np.ndarray) -> np.ndarray:
        pos = self.index.get_indexer(np.asarray(values))                     # -1 where unknown
        return (pos + 1).astype(np.int64)


@dataclass
class RankFeatures:
    users: Vocab
    items: Vocab
    contexts: dict[str, Vocab] = field(default_factory=dict)
    item_numeric: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.float32))  # (I, Ni)
    user_vectors: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.float32))  # (U, Du)
    item_vectors: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.float32))  # (I, Di)
    numeric_names: list[str] = field(default_factory=list)
    numeric_scaling: dict = field(default_factory=dict)    # how item_numeric was scaled (recorded with the ranker)

    def pairs(self, user_ids: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (user_id, item_id) pairs → vocabulary indices for `Ranker.score`; unknown ids → 0."""
        return self.users.lookup(user_ids), self.items.lookup(item_ids)


def _log_uniques(path: Path, columns: Sequence[str], read_rows: int) -> dict[str, np.ndarray]:
    """Distinct non-null values of each column, one read batch at a time (memory: the distinct values)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for rb in open_stream(path).iter_batches(batch_size=read_rows, columns=list(columns)):
        for c in columns:
            parts[c].append(pc.unique(pc.drop_null(rb.column(c))).to_numpy(zero_copy_only=False))
    return {c: sorted_unique(np.concatenate(p)) if p else np.array([]) for c, p in parts.items()}


def quantile_knots(column: np.ndarray, n: int = KNOTS) -> np.ndarray:
    """(≤ n,) the column's quantiles (NaN left out): what `quantile_normal` maps through."""
    finite = column[np.isfinite(column)]
    return np.quantile(finite, np.linspace(0, 1, n)) if len(finite) else np.zeros(1)


def quantile_normal(column: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Values → the standard normal quantile of their mid-rank among the knots; NaN → 0 (the median).
    Robust to heavy tails and outliers (a BM25 score, a price, a count) where a mean and a standard
    deviation are not, and a value between two fitted ones falls between their outputs."""
    q = len(knots)
    mid = (np.searchsorted(knots, column, "left") + np.searchsorted(knots, column, "right")) / (2.0 * q)
    out = ndtri(np.clip(mid, 0.5 / q, 1 - 0.5 / q))
    return np.where(np.isfinite(column), out, 0.0)


def _scaled(table: pd.DataFrame, items: Vocab, scaling: str) -> tuple[np.ndarray, list[str], dict]:
    """(n_items, Ni) numeric item features scaled over the catalog's items (quantile: to a standard
    normal by rank; standard: zero mean, unit variance), NaN → 0; and the fitted scaling, to record."""
    names = [c for c in table.columns if c != "item_id"]
    bad = [c for c in names if not pd.api.types.is_numeric_dtype(table[c])]
    if bad:
        raise RankingInputError(f"item features must be numeric; columns {bad} are not "
                                "(encode them, or leave them out)")
    values = table[names].to_numpy(dtype=np.float64)                         # (N, Ni)
    if scaling == "quantile":
        knots = [quantile_knots(values[:, j]) for j in range(len(names))]
        values = np.stack([quantile_normal(values[:, j], k) for j, k in enumerate(knots)], axis=1) \
            if names else values
        fitted = {"method": "quantile", "knots": {n: k.round(6).tolist() for n, k in zip(names, knots)}}
    else:
        mean = np.nanmean(values, axis=0) if len(values) else np.zeros(len(names))
        std = np.nanstd(values, axis=0) if len(values) else np.ones(len(names))
        values = np.nan_to_num((values - mean) / np.where(std > 0, std, 1.0))    # (N, Ni)
        fitted = {"method": "standard", "mean": dict(zip(names, mean.tolist())), "std": dict(zip(names, std.tolist()))}
    out = np.zeros((len(items), len(names)), np.float32)                     # (I, Ni), row 0 = OOV
    out[items.lookup(table["item_id"].to_numpy())] = values
    out[0] = 0.0
    return out, names, fitted


def _vector_table(vectors: Vectors | None, vocab: Vocab, name: str) -> np.ndarray:
    if vectors is None:
        return np.zeros((len(vocab), 0), np.float32)
    ids, vecs = np.asarray(vectors[0]), np.asarray(vectors[1], dtype=np.float32)
    if vecs.ndim != 2 or len(ids) != len(vecs):
        raise RankingInputError(f"{name} vectors must be (ids (N,), array (N, D)); got {len(ids)} ids "
                                f"and an array of shape {vecs.shape}")
    out = np.zeros((len(vocab), vecs.shape[1]), np.float32)                 # (V, D), row 0 = OOV
    out[vocab.lookup(ids)] = vecs
    out[0] = 0.0
    return out


def build_features(logs: Path, context_columns: Sequence[str] = (),
                   item_table: pd.DataFrame | pa.Table | None = None,
                   user_vectors: Vectors | None = None, item_vectors: Vectors | None = None,
                   read_rows: int = 100_000, scaling: str = "quantile") -> RankFeatures:
    """Vocabularies from one streamed pass over the logs (plus the ids of the feature tables) and the
    feature tables indexed by them. item_table: item_id + numeric columns."""
    require_columns(logs, ("user_id", "item_id", *context_columns), "ranking log")
    seen = _log_uniques(logs, ("user_id", "item_id", *context_columns), read_rows)
    if isinstance(item_table, pa.Table):
        item_table = item_table.to_pandas()
    if item_table is not None and "item_id" not in item_table.columns:
        raise RankingInputError(f"the item feature table lacks column 'item_id'; it has "
                                f"{list(item_table.columns)}")
    extra_users = [] if user_vectors is None else [np.asarray(user_vectors[0])]
    extra_items = [] if item_vectors is None else [np.asarray(item_vectors[0])]
    if item_table is not None:
        extra_items.append(item_table["item_id"].to_numpy())
    users = Vocab(np.concatenate([seen["user_id"], *extra_users]))
    items = Vocab(np.concatenate([seen["item_id"], *extra_items]))
    numeric, names, fitted = (_scaled(item_table, items, scaling) if item_table is not None
                              else (np.zeros((len(items), 0), np.float32), [], {}))
    return RankFeatures(
        users=users, items=items,
        contexts={c: Vocab(seen[c]) for c in context_columns},
        item_numeric=numeric, numeric_names=names, numeric_scaling=fitted,
        user_vectors=_vector_table(user_vectors, users, "user"),
        item_vectors=_vector_table(item_vectors, items, "item"),
    )
