"""Positive down-sampling of popular items (models/sampling.py)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from models.sampling import downsample_mask, keep_probability


def test_keep_probability_follows_the_word2vec_formula():
    ids = pd.Series([1] * 90 + [2] * 9 + [3])
    p = keep_probability(ids, threshold=0.01)
    f1 = 0.9
    assert p[0] == pytest.approx(math.sqrt(0.01 / f1) + 0.01 / f1)
    assert p[-1] == 1.0  # an item at 1% with t = 1% keeps everything
    u = np.random.default_rng(3).random(len(ids))
    np.testing.assert_array_equal(downsample_mask(ids, 0.01, u), downsample_mask(ids, 0.01, u.copy()))
    with pytest.raises(ValueError):
        keep_probability(ids, 0.0)


@pytest.mark.parametrize("string_ids", [False, True])
def test_the_streams_hard_negatives_are_the_logs_rejected_items_never_a_null_or_a_positive(tmp_path, string_ids):
    """write_sampled_streams codes the ids of the examples and the logs once and draws on the codes:
    what comes out are ids of the stream's own type, from the user's requests at or before the row,
    never a null log item and never one of the user's positives."""
    def ident(x):  # noqa: ANN001, ANN202
        return None if x is None else (f"id{x}" if string_ids else x)

    ts = pd.to_datetime(np.asarray([5, 20, 30, 6, 40]) * 60, unit="s", utc=True).astype("datetime64[us, UTC]")
    examples = pd.DataFrame({"user_id": [ident(1), ident(1), ident(1), ident(2), ident(2)],
                             "item_id": [ident(i) for i in (104, 105, 106, 107, 121)],
                             "split": ["train"] * 4 + ["test"], "timestamp": ts, "age": [1.0] * 5})
    examples.to_parquet(tmp_path / "examples.parquet", index=False)
    rows = [("r1", 1, 100, 10, "retrieved"), ("r1", 1, None, 10, "retrieved"), ("r1", 1, 104, 10, "ranked"),
            ("r2", 2, 120, 5, "ranked"), ("r2", 2, 121, 5, "retrieved"), ("r2", 2, None, 5, "ranked")]
    logs = pd.DataFrame({"request_id": [r[0] for r in rows], "user_id": [ident(r[1]) for r in rows],
                         "item_id": [ident(r[2]) for r in rows], "stage": [r[4] for r in rows],
                         "clicked": False, "position": pd.array([None] * len(rows), dtype="Int64"),
                         "ranker_score": 0.0,
                         "timestamp": pd.to_datetime([r[3] * 60 for r in rows], unit="s", utc=True)})
    logs.to_parquet(tmp_path / "logs.parquet", index=False)
    from models.negatives import load_negative_pool
    from models.params import SampleParams
    from models.sampling import write_sampled_streams

    cfg = SampleParams(popular_threshold=1.0, hard_negatives=8)
    write_sampled_streams(cfg, 0, tmp_path / "examples.parquet", load_negative_pool(tmp_path / "logs.parquet"),
                          tmp_path / "out")
    full = pd.read_parquet(tmp_path / "out/full.parquet")
    got = [sorted(v) for v in full["hard_negatives"]]
    # user 1 at minute 5: no request yet; later: r1 less its null row and 104 (a positive of user 1);
    # user 2: r2 less its null row, and 121 only where it is not a positive (the full stream holds it)
    assert got == [[], [ident(100)], [ident(100)], [ident(120)], [ident(120)]]
    train = pd.read_parquet(tmp_path / "out/train.parquet")
    # the train stream's positives exclude the test row: 121 is a negative of user 2 there
    assert [sorted(v) for v in train["hard_negatives"]][3] == sorted([ident(120), ident(121)])
