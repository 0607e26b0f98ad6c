"""Non-learned baselines that the two-tower model must beat: most popular and EASE.

EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): an item-item linear model
B = argmin ||X - XB||² + λ||B||² with diag(B) = 0, solved in closed form from P = (XᵀX + λI)⁻¹ as
B = -P / diag(P) (column-wise), diag(B) = 0; a user's scores are x_u B. X is the binary user × item
matrix of the training part. A strong baseline on implicit feedback, but it needs a dense items × items
inverse: O(I²) memory and O(I³) time, hence the catalog-size guard in the evaluate stage.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

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


def gram(x: sp.csr_matrix, block_users: int = 4096) -> np.ndarray:
    """(I, I) dense XᵀX in the dtype EASE uses for this catalog size, summed over blocks of users: one
    sparse XᵀX of a large catalog can hold more co-occurrence entries (index + value each) than the
    dense result itself."""
    n_items = x.shape[1]
    g = np.zeros((n_items, n_items), dtype=ease_dtype(n_items))
    for start in range(0, x.shape[0], block_users):
        block = x[start:start + block_users]
        g += (block.T @ block).toarray()
    return g


def ease_weights(g: np.ndarray, lam: float) -> np.ndarray:
    """(I, I) EASE item-item weights from the Gram matrix XᵀX (not modified) and the L2 penalty λ."""
    if lam <= 0:
        raise ValueError(f"EASE needs λ > 0 (got {lam})")
    regularized = g.copy()
    regularized[np.diag_indices_from(regularized)] += lam
    p = np.linalg.inv(regularized)
    b = p / (-np.diag(p))                      # column j divided by -P_jj
    b[np.diag_indices_from(b)] = 0.0
    return b


def ease_scorer(b: np.ndarray, user_items: sp.csr_matrix):  # noqa: ANN201
    """scores(start, end) → (end-start, I) float32 tensor: rows of user_items times B."""
    def scores(start: int, end: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(user_items[start:end] @ b, dtype=np.float32))
    return scores
