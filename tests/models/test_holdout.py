"""The held-out ranking task (models/holdout.py), shared by the test split and early stopping."""
from __future__ import annotations

import numpy as np
import pandas as pd

from models.early_stopping import ValidationTask
from models.encoding import FeatureEncoder
from models.holdout import catalog_task, sample_queries

T = pd.Timestamp("2024-01-01", tz="UTC")


def _rows(pairs: list[tuple[int, int, int, str]]) -> pd.DataFrame:
    """(user, item, day, split) tuples as example rows."""
    return pd.DataFrame({"user_id": [p[0] for p in pairs], "item_id": [p[1] for p in pairs],
                         "timestamp": [T + pd.Timedelta(days=p[2]) for p in pairs],
                         "split": [p[3] for p in pairs]})


EXAMPLES = _rows([
    (1, 10, 0, "train"), (1, 11, 1, "train"), (1, 11, 2, "train"),
    (1, 13, 5, "test"), (1, 11, 4, "test"), (1, 99, 3, "test"),    # 11 was seen, 99 is not in the catalog
    (2, 10, 0, "train"), (2, 10, 3, "test"),                       # nothing new to find: not queried
    (3, 12, 1, "train"), (3, 10, 2, "test"),
])
ITEMS = pd.DataFrame({"item_id": [10, 11, 12, 13, 13]})          # a duplicate catalog row counts once


def test_catalog_task_queries_first_held_out_row_and_excludes_seen_items():
    task = catalog_task(EXAMPLES, ITEMS)
    # queries in time order of their first held-out row: user 3 (day 2), user 1 (day 3, whatever the
    # file order: that row's item is not even in the catalog, its features and history still count)
    assert task.n_items == 4 and task.queries["user_id"].tolist() == [3, 1]
    assert task.queries["item_id"].tolist() == [10, 99]
    assert sorted(zip(*task.seen)) == [(0, 2), (1, 0), (1, 1)]
    assert sorted(zip(*task.relevant)) == [(0, 0), (1, 3)]
    assert task.train_cols.tolist() == [0, 1, 1, 0, 2]
    assert sorted(zip(*task.train_pairs)) == [(0, 0), (0, 1), (1, 0), (2, 2)]
    assert task.tail(0.5).tolist() == [False, False, True, True]   # items 10 and 11: 2 training rows each


def test_validation_task_follows_the_same_protocol_in_vocabulary_space():
    schema = {"user_id_dtype": "int64", "item_id_dtype": "int64"}
    encoder = FeatureEncoder.fit(schema, ITEMS, EXAMPLES, behaviour_counts=False)
    train, held = EXAMPLES[EXAMPLES["split"] == "train"], EXAMPLES[EXAMPLES["split"] == "test"]
    task = ValidationTask.build(encoder, train, held)
    catalog = catalog_task(EXAMPLES, ITEMS)
    assert task.n_users == catalog.n_users and task.users["user"].tolist() == encoder.user_ids.lookup([3, 1]).tolist()
    column = encoder.item_ids.lookup(ITEMS["item_id"].drop_duplicates())          # catalog column → vocab index
    # the vocabulary also ranks items that only occur in examples (99): one target more than the catalog
    extra = [(1, encoder.item_ids.lookup([99])[0])]
    assert sorted(zip(*task.relevant)) == sorted([(u, column[c]) for u, c in zip(*catalog.relevant)] + extra)
    oov = [(u, 0) for u in range(task.n_users)]                                    # never recommended
    assert sorted(zip(*task.seen)) == sorted([(u, column[c]) for u, c in zip(*catalog.seen)] + oov)
    assert ValidationTask.build(encoder, train, held[held["user_id"] == 2]) is None
    assert isinstance(task.seen[0], np.ndarray)


def test_sampled_queries_keep_their_own_pairs_and_the_whole_training_part():
    rng = np.random.default_rng(0)
    rows = [(u, int(i), d, "train") for u in range(60) for d, i in enumerate(rng.choice(40, 5, replace=False))]
    rows += [(u, 40 + u % 10, 9, "test") for u in range(60)]
    examples, items = _rows(rows), pd.DataFrame({"item_id": range(50)})
    full = catalog_task(examples, items)
    task = sample_queries(full, 25)
    assert task.n_users == 25 and sample_queries(full, 60) is full and sample_queries(full, None) is full
    assert task.train_pairs is full.train_pairs and task.n_items == full.n_items
    kept = task.queries["user_id"].tolist()
    # every kept user's pairs come along, renumbered to the user's new row; nobody else's
    for name in ("seen", "relevant"):
        old = {(full.queries["user_id"][r], c) for r, c in zip(*getattr(full, name))}
        new = {(task.queries["user_id"][r], c) for r, c in zip(*getattr(task, name))}
        assert new == {(u, c) for u, c in old if u in kept}
    # the same users for a larger data set that holds them (the sample follows ids, not positions)
    more = catalog_task(pd.concat([examples, _rows([(u, 41, 10, "test") for u in range(60, 90)])]), items)
    assert set(sample_queries(more, 25).queries["user_id"]) <= set(kept) | set(range(60, 90))
