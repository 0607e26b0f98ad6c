"""cold_recall@K (models/metrics.py, models/holdout.py): recall of the held-out items no training row holds."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.evaluation import most_popular_scorer
from models.holdout import catalog_task
from models.metrics import full_catalog_metrics, scorer_metrics
from models.params import EvaluateParams

EVAL = EvaluateParams(ks=[1, 2], ease=False)


def _task(test_items: tuple[int, int, int]):
    """Users a and b trained on items 1-3; a holds out test_items[:2], b test_items[2]. Items 4 and 5
    have no training row."""
    items = pd.DataFrame({"item_id": [1, 2, 3, 4, 5]})
    examples = pd.DataFrame({
        "user_id": ["a", "a", "a", "a", "b", "b", "b"],
        "item_id": [1, 2, *test_items[:2], 1, 3, test_items[2]],
        "split": ["train", "train", "test", "test", "train", "train", "test"],
    })
    return catalog_task(examples, items)


def _scores(rows: list[list[float]]):
    scores = torch.tensor(rows)
    return lambda s, e: scores[s:e]


def test_only_the_held_out_items_without_a_training_row_count_per_user():
    task = _task((4, 3, 5))                       # a: cold 4 and warm 3; b: cold 5
    assert task.cold().tolist() == [False, False, False, True, True] and task.cold_held_out() == 2
    # columns = items 1..5; a ranks 4 first (1 and 2 are its own, excluded); b ranks 2, 4, then 5
    a_first = [[0.0, 0.0, 0.1, 0.9, 0.2], [0.0, 0.9, 0.0, 0.5, 0.1]]
    m = scorer_metrics(EVAL, task, _scores(a_first))
    assert m["cold_recall@1"] == pytest.approx(0.5) and m["cold_recall@2"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx(0.25)   # a found 1 of its 2 held-out items, b none
    b_second = [[0.0, 0.0, 0.1, 0.9, 0.2], [0.0, 0.9, 0.0, 0.1, 0.5]]
    m = scorer_metrics(EVAL, task, _scores(b_second))
    assert m["cold_recall@1"] == pytest.approx(0.5) and m["cold_recall@2"] == pytest.approx(1.0)
    # popularity ranks the items without a training row last: none found above a trained one
    popular = scorer_metrics(EVAL, task, most_popular_scorer(task))
    assert popular["cold_recall@1"] == 0.0


def test_a_holdout_without_cold_items_has_no_cold_figure():
    task = _task((3, 3, 2))
    assert task.cold_held_out() == 0
    m = scorer_metrics(EVAL, task, _scores([[0.0] * 5, [0.0] * 5]))
    assert "recall@1" in m and "tail_recall@1" in m and not any(k.startswith("cold_recall") for k in m)


def test_a_group_recall_needs_its_mask():
    with pytest.raises(ValueError, match="cold_recall needs the cold item mask"):
        full_catalog_metrics(_scores([[0.0, 1.0]]), 1, 2, (np.array([], int), np.array([], int)),
                             (np.array([0]), np.array([1])), ks=[1], metrics=("cold_recall",))
