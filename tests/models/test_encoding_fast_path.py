"""Vocab.lookup's small-input path (serving: one user per request) and its arrow path (the training
stream's long columns) give the pandas path's indices."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.encoding import Z_LIMIT, NumericStats
from models.vocab import SMALL_LOOKUP, Vocab


def _slow(vocab: Vocab, values: pd.Series) -> np.ndarray:
    """The pandas path, forced."""
    return vocab._lookup_pandas(values)


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


NUMERIC = [
    pd.Series([0.0, -3.0, 5.0, None, 1e6]),
    pd.Series([3, 0, 99], dtype="int64"),                          # counts: the direct numpy path
    pd.Series([3, None, 2], dtype="Int64"),
    pd.Series([1.5, None], dtype="Float64"),
    pd.Series([True, False]),
    pd.Series([True, None], dtype="boolean"),
    pd.Series([3, None, -4], dtype=pd.ArrowDtype(__import__("pyarrow").int32())),
    pd.Series([2**64 - 1, 7], dtype="uint64"),
    pd.Series([1e6, -2.0, 2.0]),
    pd.Series(["1.5", "x", None], dtype=object),                   # strings: pandas' to_numeric
    pd.Series([None, None], dtype=object),                         # an unknown user's nulls
]


@pytest.mark.parametrize("values", NUMERIC, ids=lambda v: str(v.dtype))
def test_numeric_transform_matches_the_series_rule(values: pd.Series) -> None:
    for log in (False, True):
        stats = NumericStats(mean=1.0, std=2.0, log=log)
        x = NumericStats._values(values, log).to_numpy()
        expected = np.clip(np.nan_to_num((x - stats.mean) / stats.std, nan=0.0), -Z_LIMIT, Z_LIMIT).astype(np.float32)
        assert np.array_equal(stats.transform(values), expected)
        assert np.array_equal(stats.transform(values.to_numpy()), expected)     # an array, not a Series


LONG = [
    ("string", pd.Series([2**64 - 1, 7], dtype="uint64")),              # digits beyond int64
    ("string", pd.Series(["a", pd.NA, "b"], dtype=object)),
    ("string", pd.Series(["a", None, "b"], dtype="string")),
    ("string", pd.Series(["a", None, "7"], dtype=pd.ArrowDtype(__import__("pyarrow").large_string()))),
    ("int64", pd.Series([3, None, 1], dtype=pd.ArrowDtype(__import__("pyarrow").int32()))),
    ("string", pd.Series([-7, 7], dtype="int64")),
    ("string", pd.Series([b"a", b"b"], dtype=object)),                  # bytes: pandas path
]


@pytest.mark.parametrize("kind,values", CASES + LONG)
def test_long_lookup_matches_the_pandas_path(kind: str, values: pd.Series) -> None:
    """Above SMALL_LOOKUP values lookup hashes in arrow where the key rules allow (Vocab.lookup_arrow)."""
    fit = (pd.Series(["a", "b", "1", "2", "7", "-7", "1.5", "inf", "True", "18446744073709551615", "b'a'"])
           if kind == "string" else pd.Series([1, 2, 3]))
    vocab = Vocab.fit(fit, kind=kind)
    long = pd.concat([values] * (SMALL_LOOKUP // len(values) + 2), ignore_index=True)
    assert len(long) > SMALL_LOOKUP
    assert vocab.lookup(long).tolist() == _slow(vocab, long).tolist()
    assert vocab.lookup(long.to_numpy()).tolist() == _slow(vocab, long).tolist()        # as an array
    import pyarrow as pa
    try:
        arrow = pa.chunked_array([pa.array(long, from_pandas=True)])
    except (pa.ArrowException, TypeError):
        return                                                   # no arrow form (mixed objects)
    for values in (arrow, arrow.combine_chunks(), arrow[:3]):   # as arrow, long and short
        assert vocab.lookup(values).tolist() == _slow(vocab, long).tolist()[:len(values)]


def test_pad_lists_hashes_long_list_columns_in_arrow_with_the_same_indices() -> None:
    import pyarrow as pa

    from models.encoding import pad_lists

    vocab = Vocab.fit(pd.Series([f"i{k}" for k in range(50)]))
    rng = np.random.default_rng(0)
    rows = [[f"i{k}" for k in rng.integers(0, 60, rng.integers(0, 9))] for _ in range(200)]   # i50..: OOV
    rows[3] = None
    arrow = pd.Series(pa.array(rows, pa.list_(pa.string())), dtype=pd.ArrowDtype(pa.list_(pa.string())))
    calls = []
    original = Vocab.lookup_arrow
    Vocab.lookup_arrow = lambda self, values: calls.append(len(values)) or original(self, values)
    try:
        out = pad_lists(arrow, vocab, max_len=5)
    finally:
        Vocab.lookup_arrow = original
    assert calls and calls[0] > SMALL_LOOKUP                              # the arrow path ran
    expected = np.zeros_like(out)
    for r, row in enumerate(rows):
        for p, v in enumerate((row or [])[:5]):
            expected[r, p] = vocab._lookup_pandas(pd.Series([v]))[0]
    assert np.array_equal(out, expected)
    assert np.array_equal(pad_lists(pd.Series(rows, dtype=object), vocab, max_len=5), expected)
