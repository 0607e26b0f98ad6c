"""Easy negatives (popularity^0.75) and hard negatives mined from ranking logs (models/negatives.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.negatives import (NegativePool, attach_hard_negatives, factorize_parts, latest_request, load_negative_pool,
                              popularity_distribution)


def test_easy_negatives_follow_popularity_to_the_three_quarters():
    counts = np.array([0, 99, 15, 0, 3])             # index 0 is OOV; item 3 has no interactions
    p = popularity_distribution(counts, 0.75)
    expected = np.array([0.0, 100 ** 0.75, 16 ** 0.75, 1.0, 4 ** 0.75])
    np.testing.assert_allclose(p, expected / expected.sum())
    # the sampler the training loop uses draws from it: chi-square goodness of fit on 200k draws
    g = torch.Generator().manual_seed(0)
    n = 200_000
    draws = torch.multinomial(torch.from_numpy(p).float(), n, replacement=True, generator=g)
    observed = np.bincount(draws.numpy(), minlength=len(p))[1:]
    exp = p[1:] * n
    chi2 = float(((observed - exp) ** 2 / exp).sum())
    assert observed.sum() == n and chi2 < 16.3      # 3 dof, p = 0.001
    assert np.allclose(popularity_distribution(counts, 0.0)[1:], 0.25)   # power 0: uniform


def _ts(minutes):
    return pd.to_datetime(np.asarray(minutes) * 60, unit="s", utc=True).astype("datetime64[us, UTC]")


def _write_logs(path, rows):
    df = pd.DataFrame(rows, columns=["request_id", "user_id", "item_id", "minute", "stage", "clicked"])
    df["timestamp"] = _ts(df.pop("minute"))
    df["position"] = pd.array([None] * len(df), dtype="Int64")
    df["ranker_score"] = 0.0
    df.to_parquet(path, index=False)
    return path


LOG_ROWS = [
    # request r1 of user 1 at minute 10
    ("r1", 1, 100, 10, "retrieved", False),
    ("r1", 1, 101, 10, "ranked", False),
    ("r1", 1, 102, 10, "shown", False),        # shown, not clicked: only with the flag
    ("r1", 1, 103, 10, "shown", True),         # clicked: never a negative
    ("r1", 1, 104, 10, "retrieved", False),    # a positive of user 1: never a negative
    # request r2 of user 1 at minute 30 (after the example at minute 20: must not leak into it)
    ("r2", 1, 110, 30, "retrieved", False),
    # request r3 of user 2 at minute 5
    ("r3", 2, 120, 5, "ranked", False),
    ("r3", 2, 121, 5, "retrieved", False),
]


@pytest.fixture()
def logs(tmp_path):
    return _write_logs(tmp_path / "ranking_logs.parquet", LOG_ROWS)


def _examples():
    return pd.DataFrame({"user_id": [1, 1, 1, 2, 3], "item_id": [104, 105, 106, 107, 108],
                         "timestamp": _ts([5, 20, 30, 6, 50])})


def _mine(logs, include_shown=False, k=8):
    ex = _examples()
    pool = load_negative_pool(logs, include_shown_unclicked=include_shown)
    lists = attach_hard_negatives(ex, pool, ex, k, np.random.default_rng(0)).to_pylist()
    return [set(v) for v in lists]


def test_hard_negatives_are_the_users_rejected_items_at_or_before_the_example(logs):
    got = _mine(logs)
    assert got[0] == set()               # minute 5: user 1 had no request yet
    assert got[1] == {100, 101}          # minute 20: r1 only; 102 shown, 103 clicked, 104 a positive
    assert got[2] == {110}               # minute 30: r2 at the same time counts, r1 is older
    assert got[3] == {120, 121}          # user 2's own request
    assert got[4] == set()               # user 3 has no logs
    # an item the user interacted with (positives) is removed even when the logs rejected it
    ex = _examples()
    pool = load_negative_pool(logs)
    more = pd.concat([ex, pd.DataFrame({"user_id": [1], "item_id": [100], "timestamp": _ts([99])})])
    lists = attach_hard_negatives(ex, pool, more, 8, np.random.default_rng(0)).to_pylist()
    assert set(lists[1]) == {101}


def test_shown_unclicked_items_are_negatives_only_with_the_flag(logs):
    assert 102 not in _mine(logs)[1]
    with_flag = _mine(logs, include_shown=True)
    assert with_flag[1] == {100, 101, 102}
    assert all(103 not in s for s in with_flag)   # clicked items never


def test_hard_negatives_are_distinct_capped_and_typed_like_the_stream(tmp_path):
    rows = [("r", "u", f"i{j}", 1, "retrieved", False) for j in range(30)]
    logs = _write_logs(tmp_path / "logs.parquet", rows)
    ex = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["i0", "x", "y"], "timestamp": _ts([2, 3, 4])})
    lists = attach_hard_negatives(ex, load_negative_pool(logs), ex, 5, np.random.default_rng(1))
    assert str(lists.type) == "list<item: string>"
    for v in lists.to_pylist():
        assert 0 < len(v) <= 5 and len(set(v)) == len(v) and "i0" not in v


def test_empty_logs_give_no_hard_negatives(tmp_path):
    logs = _write_logs(tmp_path / "empty.parquet", [])
    pool = load_negative_pool(logs)
    assert pool.empty and pool.log_rows == 0
    ex = _examples()
    assert attach_hard_negatives(ex, pool, ex, 4, np.random.default_rng(0)).to_pylist() == [[]] * len(ex)


def test_a_log_row_without_an_item_is_never_a_negative(tmp_path):
    rows = [("r", "u", None, 1, "retrieved", False), ("r", "u", "i1", 1, "ranked", False)]
    logs = _write_logs(tmp_path / "logs.parquet", rows)
    ex = pd.DataFrame({"user_id": ["u"] * 4, "item_id": ["x"] * 4, "timestamp": _ts([2, 3, 4, 5])})
    for seed in range(5):
        lists = attach_hard_negatives(ex, load_negative_pool(logs), ex, 4, np.random.default_rng(seed))
        assert lists.to_pylist() == [["i1"]] * 4


@pytest.mark.parametrize("string_ids", [False, True])
def test_each_example_finds_its_users_latest_request_at_or_before_it(string_ids):
    """latest_request against a plain reference on small random logs full of ties: the same user's
    requests at one time (the last request code wins), requests at the example's own time (they
    count), users with requests and no examples, and examples of users without requests."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        ids = [f"u{i}" for i in range(4)] if string_ids else list(range(4))
        n, r = int(rng.integers(0, 30)), int(rng.integers(1, 20))
        ex = pd.DataFrame({"user_id": rng.choice(ids[:3], n), "timestamp": _ts(rng.integers(0, 8, n).tolist())})
        users = pd.Series(rng.choice(ids[1:], r))
        times = pd.Series(_ts(rng.integers(0, 8, r).tolist()))
        pool = NegativePool(request=np.zeros(r, np.int64), user=users, item=users, request_user=users,
                            request_time=times, log_rows=r)
        expected = [max((j for j in range(r) if users[j] == u and times[j] <= t), default=-1,
                        key=lambda j: (times[j], j))
                    for u, t in zip(ex["user_id"], ex["timestamp"])]
        assert latest_request(ex, pool).tolist() == expected


def test_factorize_parts_codes_as_one_factorize_of_the_values():
    """Categorical parts (unused categories, nulls, categories in another order than their rows use
    them) are coded through their categories: the same codes and uniques as pd.factorize of every
    part's values concatenated."""
    rng = np.random.default_rng(3)
    ids = np.array([f"u{j}" for j in range(40)], dtype=object)
    plain = pd.Series(ids[rng.integers(0, 25, 300)])
    rows = rng.integers(-1, 40, 2_000)                                  # -1: null rows
    cats = pd.Series(pd.Categorical.from_codes(rows, categories=pd.Index(ids[rng.permutation(40)])))
    few = pd.Series(pd.Categorical.from_codes(rng.integers(0, 5, 50), categories=pd.Index(ids[::-1])))
    empty = pd.Series(pd.Categorical([], categories=pd.Index(ids)))
    parts = [plain, cats, empty, few]
    codes, uniques = factorize_parts(parts)
    want, want_uniques = pd.factorize(pd.concat([p.astype(object) for p in parts], ignore_index=True))
    assert list(uniques) == list(want_uniques)
    np.testing.assert_array_equal(np.concatenate(codes), want)
    assert [len(c) for c in codes] == [len(p) for p in parts]


def test_the_pool_is_the_same_from_dictionary_pages_and_plain_strings(tmp_path):
    """String ids are read as the file's dictionaries (per row group, ordered as the writer met them,
    shown rows included): requests, users and items come out as from plain strings, the requests
    numbered in the order the kept rows first use them."""
    rows = [("b", "ub", "ix", 1, "shown", False)]                     # b's first row is not kept
    rows += [("a", "ua", f"i{j}", 2, "retrieved", False) for j in range(5)]
    rows += [("b", "ub", "iy", 3, "ranked", False), ("c", None, "iz", 4, "retrieved", False)]
    rows += [(f"r{j % 7}", f"u{j % 5}", f"i{j % 11}", j, "retrieved", False) for j in range(60)]
    frame = pd.DataFrame(rows, columns=["request_id", "user_id", "item_id", "minute", "stage", "clicked"])
    frame["timestamp"] = _ts(frame.pop("minute"))
    for name, dictionary in (("dict.parquet", True), ("plain.parquet", False)):
        frame.to_parquet(tmp_path / name, index=False, use_dictionary=dictionary, row_group_size=16)
    got, plain = (load_negative_pool(tmp_path / n) for n in ("dict.parquet", "plain.parquet"))
    kept = frame[frame["stage"] != "shown"]
    assert list(got.request) == sorted(pd.factorize(kept["request_id"])[0])   # a, b, c, r0, ... by first use
    assert got.request_user.astype(object).fillna("<null>").tolist()[:3] == ["ua", "ub", "<null>"]
    for pool in (got, plain):
        assert len(pool.request) == len(kept) and pool.log_rows == len(frame)
    np.testing.assert_array_equal(got.request, plain.request)
    for field in ("user", "item", "request_user"):
        assert getattr(got, field).astype(object).fillna("<null>").tolist() == \
            getattr(plain, field).astype(object).fillna("<null>").tolist()
    assert got.request_time.tolist() == plain.request_time.tolist()
