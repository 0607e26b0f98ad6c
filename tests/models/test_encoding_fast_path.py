"""Vocab.lookup's small-input path (serving: one user per request) gives the pandas path's indices."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.encoding import NumericStats
from models.vocab import SMALL_LOOKUP, Vocab


def _slow(vocab: Vocab, values: pd.Series) -> np.ndarray:
    """The pandas path, forced: the same call on a series longer than SMALL_LOOKUP, cut back."""
    pad = pd.Series([values.iloc[0] if len(values) else None] * (SMALL_LOOKUP + 1), dtype=values.dtype)
    return vocab.lookup(pd.concat([values, pad], ignore_index=True))[:len(values)]


CASES = [
    ("int64", pd.Series([3, 1, 99, 2], dtype="int64")),
    ("int64", pd.Series([3, None, 2], dtype="Int64")),
    ("int64", pd.Series([3.0, 1.0], dtype="float64")),            # not covered: pandas path
    ("string", pd.Series(["a", "zz", None, "b"], dtype=object)),
    ("string", pd.Series(["a", float("nan")], dtype=object)),
    ("string", pd.Series([1.0, 2.0, np.nan], dtype="float64")),   # integral floats print as ints
    ("string", pd.Series([1.5, 2.0], dtype="float64")),
    ("string", pd.Series([1.0, np.inf], dtype="float64")),
    ("string", pd.Series([7, 8], dtype="int64")),
    ("string", pd.Series([7, None], dtype="Int64")),
    ("string", pd.Series([True, False], dtype=bool)),              # not covered: pandas path
    ("string", pd.Series([1, "a"], dtype=object)),                 # mixed: pandas path
]


@pytest.mark.parametrize("kind,values", CASES)
def test_small_lookup_matches_the_pandas_path(kind: str, values: pd.Series) -> None:
    fit = pd.Series(["a", "b", "1", "2", "7", "1.5", "inf", "True"]) if kind == "string" else pd.Series([1, 2, 3])
    vocab = Vocab.fit(fit, kind=kind)
    assert vocab.lookup(values).tolist() == _slow(vocab, values).tolist()


def test_numeric_transform_matches_the_series_rule() -> None:
    values = pd.Series([0.0, -3.0, 5.0, None, 1e6])
    for log in (False, True):
        stats = NumericStats.fit(values, log=log)
        x = NumericStats._values(values, log).to_numpy()
        expected = np.nan_to_num((x - stats.mean) / stats.std, nan=0.0).astype(np.float32)
        assert np.array_equal(stats.transform(values), expected)
