"""Array helpers shared by the stages."""
from __future__ import annotations

import numpy as np
import pandas as pd


def run_begins(values: np.ndarray) -> np.ndarray:
    """True where a run of equal neighbours begins (the first element, then each change)."""
    begins = np.ones(len(values), dtype=bool)
    np.not_equal(values[1:], values[:-1], out=begins[1:])
    return begins


def run_start(begins: np.ndarray) -> np.ndarray:
    """Per element, the position where its run begins (`begins` as run_begins gives it)."""
    return np.maximum.accumulate(np.where(begins, np.arange(len(begins)), 0))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values of a 1-D array, ascending: np.unique without its hash table.

    numpy 2.4's np.unique (no return_* argument) hashes: 10M random int64 took 10.1-11.4 s here, against
    0.12 s for a sort and a comparison of neighbours (its return_inverse path sorts: 1.4 s). Objects
    (string ids) are the other way round: comparing two Python strings is the cost, so they are hashed
    first (pandas) and only the distinct ones sorted (1.3 s -> a fraction for the 700k bench log's ids
    in 29 read batches)."""
    values = np.asarray(values).ravel()
    if values.dtype == object:
        return np.sort(pd.unique(values))
    ordered = np.sort(values)
    return ordered[run_begins(ordered)]


def search_sorted(members: np.ndarray, values: np.ndarray) -> np.ndarray:
    """np.searchsorted(members, values) (side left), searching the values in their own sorted order:
    binary searches of values in random order miss the cache at every step (9M values in 8M
    members: 5.2 s in their given order, 1.0 s sorted first)."""
    values = np.asarray(values)
    order = np.argsort(values)
    at = np.empty(len(values), dtype=np.intp)
    at[order] = np.searchsorted(members, values[order])
    return at


def isin_sorted(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """np.isin(values, members) for `members` ascending (sorted_unique's output): 9M values in 8M
    members took 11.9 s with np.isin (its sort kind 10.5 s), 1.0 s this way (search_sorted)."""
    values = np.asarray(values)
    if len(members) == 0:
        return np.zeros(len(values), dtype=bool)
    return members[np.minimum(search_sorted(members, values), len(members) - 1)] == values


def micros(ts: pd.Series) -> np.ndarray:
    """Timestamps as int64 microseconds since the epoch (UTC)."""
    return pd.to_datetime(ts, utc=True).astype("datetime64[us, UTC]").astype("int64").to_numpy()
