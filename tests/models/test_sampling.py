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
