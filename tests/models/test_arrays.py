"""models/arrays.py: the sort-based stand-ins give what numpy's own calls give."""
from __future__ import annotations

import numpy as np
import pytest

from models.arrays import isin_sorted, run_begins, run_start, search_sorted, sorted_unique


@pytest.mark.parametrize("n", [0, 1, 2, 1000])
def test_sorted_unique_is_np_unique(n):
    rng = np.random.default_rng(n)
    for values in (rng.integers(-5, 5, n), rng.integers(0, 2**62, n), rng.normal(size=n),
                   np.sort(rng.integers(0, 50, n))[::-1],
                   np.array([f"u{v}" for v in rng.integers(0, 300, n)], dtype=object)):   # string ids: hashed first
        got = sorted_unique(values)
        assert got.dtype == values.dtype
        np.testing.assert_array_equal(got, np.unique(values))


@pytest.mark.parametrize("n_values,n_members", [(0, 5), (5, 0), (1, 1), (2000, 300), (300, 2000)])
def test_isin_sorted_is_np_isin(n_values, n_members):
    rng = np.random.default_rng(n_values + n_members)
    values = rng.integers(-20, 400, n_values)             # repeats, negatives, beyond the largest member
    members = sorted_unique(rng.integers(0, 300, n_members))
    np.testing.assert_array_equal(isin_sorted(values, members), np.isin(values, members))


@pytest.mark.parametrize("n_values,n_members", [(0, 5), (5, 0), (1, 1), (2000, 300)])
def test_search_sorted_is_np_searchsorted(n_values, n_members):
    rng = np.random.default_rng(n_values * 7 + n_members)
    values = rng.integers(-20, 400, n_values)
    members = np.sort(rng.integers(0, 300, n_members))     # repeats: the leftmost place, as numpy's
    np.testing.assert_array_equal(search_sorted(members, values), np.searchsorted(members, values))


def test_runs_begin_at_each_change_and_every_element_knows_its_runs_start():
    values = np.array([3, 3, 1, 1, 1, 3, 7])
    begins = run_begins(values)
    assert begins.tolist() == [True, False, True, False, False, True, True]
    assert run_start(begins).tolist() == [0, 0, 2, 2, 2, 5, 6]
    assert run_begins(np.array([], dtype=np.int64)).tolist() == run_start(np.zeros(0, bool)).tolist() == []
