"""Tables read in bounded batches (validation/batches.py)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.validation.contract_data import ingested_tables
from validation.batches import Source, distinct_values


def test_distinct_values_are_exact_over_batches_and_capped(tmp_path: Path):
    """Every distinct title over batches of 16 (a sample would undercount them), and no more than
    the cap."""
    clean = ingested_tables(tmp_path / "ingested")
    items = Source("items", clean / "items.parquet")
    titles = pd.read_parquet(clean / "items.parquet")["title"]
    got = distinct_values(items, ["title", "year"], chunk_rows=16, cap=1000)
    assert got["title"].count() == titles.nunique() and len(got) == titles.nunique()
    assert distinct_values(items, ["title"], chunk_rows=7, cap=5)["title"].count() == 5


def test_key_hashes_agree_across_batch_dtypes_and_tell_keys_apart():
    """A key in a batch with nulls (Int64, or float64) hashes as in a batch without (int64); times
    hash by instant whatever the zone; different keys (also the same values in swapped columns) differ."""
    from validation.batches import UniqueKey, _key_hashes

    key = UniqueKey(("user_id", "item_id", "timestamp"), "dup")
    t = pd.Timestamp("2024-03-04 10:00", tz="UTC")
    plain = pd.DataFrame({"user_id": [1, 2], "item_id": [2, 1], "timestamp": [t, t]})
    nullable = pd.DataFrame({"user_id": pd.array([1, 2, None], dtype="Int64"), "item_id": [2.0, 1.0, float("nan")],
                             "timestamp": [t.tz_convert("Europe/Berlin")] * 2 + [pd.NaT]})
    h_plain, v_plain = _key_hashes(plain, key)
    h_null, v_null = _key_hashes(nullable, key)
    assert v_plain.all() and v_null.tolist() == [True, True, False]
    assert (h_plain == h_null[:2]).all()
    assert h_plain[0] != h_plain[1]          # (1, 2) and (2, 1): the order of the columns counts
    strings = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i1", "i2"], "timestamp": [t, t]})
    assert len(set(_key_hashes(strings, key)[0])) == 2
