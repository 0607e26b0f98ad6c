"""Feature encoding (models/encoding.py): vocabularies with OOV, padding, numerics, JSON round trip."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from models.encoding import FeatureEncoder, NumericStats, Vocab, is_count_column, latest_per_user, pad_lists
from training_data import TINY_SCHEMA, tiny_frames

def test_vocab_maps_unknown_and_null_to_oov_and_normalizes_int_ids():
    v = Vocab.fit(pd.Series([5, 3, 5, 7]), kind="int64")
    assert v.values == [5, 3, 7] and v.size == 4
    assert v.lookup(pd.Series([5.0, np.nan, 9, 7])).tolist() == [1, 0, 0, 3]
    assert v.lookup(["3", "x"]).tolist() == [2, 0]
    s = Vocab.fit(pd.Series(["a", "b", "b", None]), min_count=2)
    assert s.values == ["b"] and s.lookup(["a", "b", None]).tolist() == [0, 1, 0]
    assert Vocab.from_json(v.to_json()).lookup([7, 5]).tolist() == [3, 1]


def test_pad_lists_pads_truncates_and_treats_null_as_empty():
    v = Vocab.fit(pd.Series(["a", "b", "c"]))
    lists = pd.Series([np.array(["c", "a", "b"]), np.array([], dtype=object), None, ["zzz", "b"]])
    out = pad_lists(lists, v, max_len=2)
    assert out.tolist() == [[3, 1], [0, 0], [0, 0], [0, 2]]


def test_numeric_standardization_fills_nulls_with_mean():
    s = NumericStats.fit(pd.Series([1.0, 3.0, np.nan]))
    assert (s.mean, s.std) == (2.0, 1.0)
    assert s.transform(pd.Series([3.0, np.nan])).tolist() == [1.0, 0.0]
    assert NumericStats.fit(pd.Series([5.0, 5.0])).std == 1.0  # constant column: no division by 0


def test_feature_encoder_round_trips_through_json_and_tolerates_missing_columns(tmp_path):
    items, examples = tiny_frames()
    enc = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    assert enc.item_ids.values == [10, 11, 12, 13] and enc.history_length == 1
    enc.save(tmp_path / "encoder.json")
    loaded = FeatureEncoder.load(tmp_path / "encoder.json")
    for a, b in ((enc.encode_items(items), loaded.encode_items(items)),
                 (enc.encode_users(examples), loaded.encode_users(examples))):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    users = loaded.encode_users(pd.DataFrame({"user_id": [99]}))  # unknown user, no features, no history
    assert users["user"].tolist() == [0] and users["history"].tolist() == [[0]]
    assert users["cat"].tolist() == [[0]] and users["num"].tolist() == [[0.0]]


def test_behaviour_counts_are_log_scaled_user_numerics_unless_switched_off(tmp_path):
    items, examples = tiny_frames()
    examples = examples.assign(interactions_total=[0, 1, 0], interactions_7d=[0, 1, 0])
    enc = FeatureEncoder.fit(TINY_SCHEMA, items, examples)
    assert list(enc.users.numeric) == ["age", "interactions_total", "interactions_7d"]
    stats = enc.users.numeric["interactions_total"]
    logs = np.log1p([0, 1, 0])
    assert stats.log and math.isclose(stats.mean, logs.mean()) and math.isclose(stats.std, logs.std())
    enc.save(tmp_path / "encoder.json")
    num = FeatureEncoder.load(tmp_path / "encoder.json").encode_users(
        examples.assign(interactions_total=[0, 1, 1000]))["num"]
    assert num[2, 1] == pytest.approx((np.log1p(1000) - logs.mean()) / logs.std())
    off = FeatureEncoder.fit(TINY_SCHEMA, items, examples, behaviour_counts=False)
    assert list(off.users.numeric) == ["age"]
    assert is_count_column("interactions_total") and is_count_column("interactions_30d")
    assert not is_count_column("interactions_xd") and not is_count_column("item_popularity_7d")


def test_each_users_latest_row_is_the_full_sorts_row_in_the_same_order():
    """latest_per_user replaces sorting the whole frame (0.85 GB at 10M): the same rows, labels and
    order, ties in time resolved to the later row, on a frame with a shuffled index as a part is."""
    rng = np.random.default_rng(3)
    n = 5_000
    frame = pd.DataFrame({
        "user_id": rng.choice([f"u{i}" for i in range(300)], n),
        "timestamp": pd.to_datetime(rng.integers(0, 400, n), unit="D", utc=True),   # many ties
        "country": rng.choice(["de", "fr", None], n),
    }, index=rng.permutation(n) + 10)
    expected = frame.sort_values("timestamp", kind="stable").drop_duplicates("user_id", keep="last")
    pd.testing.assert_frame_equal(latest_per_user(frame), expected)
    untimed = frame.drop(columns="timestamp")
    pd.testing.assert_frame_equal(latest_per_user(untimed), untimed.drop_duplicates("user_id", keep="last"))
