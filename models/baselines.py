"""Non-learned baselines that the two-tower model must beat: most popular and EASE.

EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): an item-item linear model
B = argmin ||X - XB||² + λ||B||² with diag(B) = 0, solved in closed form from P = (XᵀX + λI)⁻¹ as
B = -P / diag(P) (column-wise), diag(B) = 0; a user's scores are x_u B. X is the binary user × item
matrix of the training part. A strong baseline on implicit feedback, but it needs a dense items × items
inverse: O(I²) memory and O(I³) time, hence the catalog-size guard (evaluate.ease_max_items).
XᵀX + λI is block diagonal over the connected components of the item co-occurrence graph (two items
are linked when a user has both), and so is its inverse: each component is solved on its own, so the
time is O(Σ size³), much less than O(I³) on sparse data where most users have a few items.
λ is picked by validation NDCG on the training part's own temporal split (`ease_baseline`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.linalg import get_lapack_funcs
from scipy.sparse.csgraph import connected_components

from models.errors import ModelInputError
from models.holdout import CatalogTask, catalog_task, sample_queries
from models.metrics import full_catalog_metrics, scorer_figures
from models.params import EvaluateParams
from models.split import temporal_split

# Above this many items the Gram matrix and its inverse are kept in float32: half the memory (2 × I² × 4
# bytes), and XᵀX + λI with λ ≥ 1 is well conditioned enough that float32 loses nothing at top-K.
FLOAT64_MAX_ITEMS = 5000


def most_popular_scores(train_item_cols: np.ndarray, n_items: int) -> torch.Tensor:
    """(n_items,) interaction counts in the training part: the same ranking for every user."""
    counts = np.bincount(np.asarray(train_item_cols, dtype=np.int64), minlength=n_items)[:n_items]
    return torch.as_tensor(counts, dtype=torch.float32)


def binary_matrix(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_items: int) -> sp.csr_matrix:
    """(n_rows, n_items) CSR with 1.0 where a (row, col) pair occurs (repeats count once)."""
    x = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (np.asarray(rows), np.asarray(cols))),
                      shape=(n_rows, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def ease_dtype(n_items: int) -> type:
    return np.float64 if n_items <= FLOAT64_MAX_ITEMS else np.float32


def ease_memory_gb(n_items: int) -> float:
    """Peak memory of the closed form: the Gram matrix plus its inverse."""
    return 2 * n_items * n_items * np.dtype(ease_dtype(n_items)).itemsize / 1e9


# a block's XᵀX with fewer stored entries than I² / SCATTER_MAX_SHARE is added entry by entry (12+ bytes
# an entry for its indices and the gathered values); a denser one through one dense copy (4-8 bytes an
# entry of I²). 20,000 items, 100,000 users with 10 items each: 74.1 -> 0.4 s; 6,000 items: 1.6 -> 0.1 s.
SCATTER_MAX_SHARE = 3


def gram(x: sp.csr_matrix, block_users: int = 4096) -> np.ndarray:
    """(I, I) dense XᵀX in the dtype EASE uses for this catalog size, summed over blocks of users: one
    sparse XᵀX of a large catalog can hold more co-occurrence entries (index + value each) than the
    dense result itself."""
    n_items = x.shape[1]
    g = np.zeros((n_items, n_items), dtype=ease_dtype(n_items))
    for start in range(0, x.shape[0], block_users):
        block = x[start:start + block_users]
        product = block.T @ block
        if product.nnz * SCATTER_MAX_SHARE > n_items * n_items:
            g += product.toarray()
        else:    # a few co-occurrences: added where they are, not through a dense I × I copy
            product = product.tocoo()
            product.sum_duplicates()           # fancy-index += applies a repeated (i, j) once
            g[product.row, product.col] += product.data
    return g


def item_components(x: sp.csr_matrix) -> np.ndarray:
    """(I,) a component label per item of the graph that links two items when a user of x has both
    (found on the users-items graph: O(nnz), never the items × items one). An item no user has is a
    component of its own."""
    n_users = x.shape[0]
    _, labels = connected_components(sp.bmat([[None, x], [x.T, None]], format="csr"), directed=False)
    return labels[n_users:]


def _blocks(components: np.ndarray) -> list[np.ndarray]:
    """The item indices of each component with at least two items, in ascending order."""
    order = np.argsort(components, kind="stable")
    bounds = np.flatnonzero(np.diff(components[order])) + 1
    return [idx for idx in np.split(order, bounds) if len(idx) > 1]


# rows × columns copied at a time when the inverse's computed triangle is mirrored into the other
MIRROR_ROWS = 1024


def _regularized(g: np.ndarray, lam: float, idx: np.ndarray | None) -> np.ndarray:
    """A new array: the block idx × idx of g (all of g when idx is None) plus λ on its diagonal."""
    out = g.copy() if idx is None else g[np.ix_(idx, idx)]     # fancy indexing copies already
    out[np.diag_indices_from(out)] += lam
    return out


def spd_inverse(a: np.ndarray) -> np.ndarray | None:
    """The inverse of the symmetric positive definite, C-ordered `a` (overwritten: the inverse is
    computed in its memory and returned as it), or None when `a` is not positive definite in its
    precision.

    Cholesky (LAPACK potrf then potri) takes about half the flops of the LU factorization and solve
    of a general inverse: 4.8 -> 1.7 s for 5,000 items on 2 threads (float32, 3,000 items: 1.14 ->
    0.27 s), the same inverse to 1e-15 relative (float32: 5e-7), and no second I × I buffer. LAPACK
    fills one triangle; it is mirrored into the other in bands of MIRROR_ROWS rows."""
    potrf, potri = get_lapack_funcs(("potrf", "potri"), (a,))
    # a C-ordered symmetric matrix is, read column-major as LAPACK reads it, its own transpose: `a.T`
    # is passed without a copy and overwritten in place
    factor, info = potrf(a.T, lower=False, clean=False, overwrite_a=True)
    if info != 0:
        return None
    inverse, info = potri(factor, lower=False, overwrite_c=True)
    if info != 0:
        return None
    for start in range(0, len(inverse), MIRROR_ROWS):      # upper triangle -> lower, a band at a time
        stop = start + MIRROR_ROWS
        inverse[stop:, start:stop] = inverse[start:stop, stop:].T
        band = inverse[start:stop, start:stop]
        lower = np.tril_indices(len(band), -1)
        band[lower] = band.T[lower]
    return inverse.T     # the same memory as `a`, in a's C order (the inverse is symmetric)


def _block_weights(g: np.ndarray, lam: float, idx: np.ndarray | None = None) -> np.ndarray:
    """EASE's weights of the block idx × idx of XᵀX (g, not modified; None: the whole matrix)."""
    p = spd_inverse(_regularized(g, lam, idx))
    if p is None:    # not positive definite in its precision (float32, a tiny λ): a general inverse
        p = np.linalg.inv(_regularized(g, lam, idx))
    p /= -np.diag(p).copy()                    # column j divided by -P_jj, in place
    p[np.diag_indices_from(p)] = 0.0
    return p


def ease_weights(g: np.ndarray, lam: float, components: np.ndarray | None = None) -> np.ndarray:
    """(I, I) EASE item-item weights from the Gram matrix XᵀX (not modified) and the L2 penalty λ.

    With `components` (item_components of the same X), each block is inverted on its own: the same
    weights (a block-diagonal matrix's inverse is the inverse of each block; an item linked to no other
    gets a zero row and column, as the whole inverse gives it). Without, one inverse of the whole."""
    if lam <= 0:
        raise ValueError(f"EASE needs λ > 0 (got {lam})")
    n_items = len(g)
    blocks = [np.arange(n_items)] if components is None else _blocks(np.asarray(components))
    if len(blocks) == 1 and len(blocks[0]) == n_items:
        return _block_weights(g, lam)
    b = np.zeros_like(g)
    for idx in blocks:
        b[np.ix_(idx, idx)] = _block_weights(g, lam, idx)
    return b


def ease_scorer(b: np.ndarray, user_items: sp.csr_matrix):  # noqa: ANN201
    """scores(start, end) → (end-start, I) float32 tensor: rows of user_items times B."""
    def scores(start: int, end: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(user_items[start:end] @ b, dtype=np.float32))
    return scores


def _n_rows(codes: np.ndarray) -> int:
    return int(codes.max()) + 1 if len(codes) else 0


def _fitted_weights(task: CatalogTask, lam: float) -> np.ndarray:
    """EASE's B fitted on the task's training pairs."""
    x = binary_matrix(*task.train_pairs, _n_rows(task.train_pairs[0]), task.n_items)
    return ease_weights(gram(x), lam, item_components(x))


def _lambda_scan(eval_cfg: EvaluateParams, examples: pd.DataFrame, items: pd.DataFrame, k: int) -> tuple[float, dict]:
    """(best λ, the validation figures): NDCG@k of each λ in eval_cfg.ease_lambdas on each user's last
    share of training rows (the test split's rules), fitted on the rest."""
    train = examples[examples["split"] == "train"].reset_index(drop=True)
    val = sample_queries(catalog_task(train.assign(split=temporal_split(train, eval_cfg.validation)), items),
                         eval_cfg.max_users)
    tune_at = f"ndcg@{k}"
    scan: dict[str, float] = {}
    if val.n_users > 0 and len(eval_cfg.ease_lambdas) > 1:
        x = binary_matrix(*val.train_pairs, _n_rows(val.train_pairs[0]), val.n_items)
        g, components = gram(x), item_components(x)
        queries = binary_matrix(*val.seen, val.n_users, val.n_items)
        for lam in eval_cfg.ease_lambdas:
            scorer = ease_scorer(ease_weights(g, lam, components), queries)
            m = full_catalog_metrics(scorer, val.n_users, val.n_items,
                                     val.seen, val.relevant, [k], metrics=("ndcg",))
            scan[f"{lam:g}"] = round(m[tune_at], 6)
        best = max(eval_cfg.ease_lambdas, key=lambda lam: scan[f"{lam:g}"])   # first of equal scores
        return best, {"metric": tune_at, "users": val.n_users, "by_lambda": scan}
    # nothing to tune on: say so in metrics.json instead of leaving an empty scan unexplained
    why = ("one λ in evaluate.ease_lambdas" if len(eval_cfg.ease_lambdas) <= 1 else
           "no user has enough training rows for evaluate.validation's split (min_user_interactions="
           f"{eval_cfg.validation.min_user_interactions})")
    return eval_cfg.ease_lambdas[0], {"metric": tune_at, "users": val.n_users, "by_lambda": {},
                                      "note": f"λ not tuned: {why}; the first of evaluate.ease_lambdas is used"}


def ease_baseline(eval_cfg: EvaluateParams, task: CatalogTask, examples: pd.DataFrame, items: pd.DataFrame,
                  ks: list[int]) -> dict:
    """EASE with λ picked by validation NDCG@ks[0] on a split carved from the training part, refit on
    the whole training part, scored as every model is (metrics.scorer_figures, at every K of
    eval_cfg.ks): {"ease": metrics, "ease_lambda", "ease_validation", "ease_standard_errors"}. Skipped (with the
    reason) when eval_cfg.ease is off or the catalog is above eval_cfg.ease_max_items."""
    n_items = task.n_items
    if not eval_cfg.ease or n_items > eval_cfg.ease_max_items:
        reason = ("evaluate.ease is false" if not eval_cfg.ease else
                  f"catalog has {n_items} items > evaluate.ease_max_items={eval_cfg.ease_max_items} (the closed "
                  f"form needs ~{ease_memory_gb(n_items):.1f} GB and O(items³) time)")
        return {"ease": {"skipped": reason}, "ease_lambda": None}
    if "timestamp" not in examples.columns:
        raise ModelInputError("column 'timestamp' is needed to carve EASE's validation split "
                              "(or set evaluate.ease: false)")
    best, validation = _lambda_scan(eval_cfg, examples, items, ks[0])
    queries = binary_matrix(*task.seen, task.n_users, n_items)
    figures = scorer_figures(eval_cfg, task, ease_scorer(_fitted_weights(task, best), queries))
    # no timings here: metrics.json is a DVC metric, and equal inputs must give an equal file
    return {"ease": figures.means, "ease_lambda": best, "ease_validation": validation,
            "ease_standard_errors": figures.errors}
