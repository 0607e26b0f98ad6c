"""Non-learned baselines that the two-tower model must beat."""
from __future__ import annotations

import numpy as np
import torch


def most_popular_scores(train_item_cols: np.ndarray, n_items: int) -> torch.Tensor:
    """(n_items,) interaction counts in the training part: the same ranking for every user."""
    counts = np.bincount(np.asarray(train_item_cols, dtype=np.int64), minlength=n_items)[:n_items]
    return torch.as_tensor(counts, dtype=torch.float32)
