"""Tables read in bounded batches (validation/batches.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tests.validation.contract_data import ingested_tables
from validation.batches import Source, distinct_values, row_frame, to_pandas


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
    # the row frames' arrow strings (hashed by their distinct values) hash as Python strings do
    arrow = row_frame(pa.table({"user_id": ["u1", "u1", None, "u2"], "item_id": ["i1", "i2", "i1", "i1"],
                                "timestamp": [t, t, t, t]}))
    h_arrow, v_arrow = _key_hashes(arrow, key)
    assert v_arrow.tolist() == [True, True, False, True]
    assert (h_arrow[:2] == _key_hashes(strings, key)[0]).all() and len(set(h_arrow[v_arrow])) == 3


def test_row_checks_see_list_columns_as_lengths():
    """GX fingerprints every batch it is given; a column of Python lists makes it pickle the whole
    frame (20 s per 1M training examples). The row checks get each list's length instead: null stays
    null (the null share is exact), an empty list is 0."""
    table = pa.table({"user_id": ["a", "b", "c"],
                      "recent_items": pa.array([["x", "y"], None, []], pa.list_(pa.string()))})
    frame = row_frame(table)
    assert frame["recent_items"].tolist() == [2, pd.NA, 0] and str(frame["recent_items"].dtype) == "Int64"
    assert frame["user_id"].tolist() == ["a", "b", "c"]
    pd.util.hash_pandas_object(frame)            # GX's fingerprint, without its pickle fallback
    with pytest.raises(TypeError):
        pd.util.hash_pandas_object(to_pandas(table))


def test_row_frames_give_strings_a_string_dtype() -> None:
    """GX checks a type list against the dtype of a typed column once, and an object column value by
    value (19 s of a 14M-row log's 120): the row checks' frames keep strings typed, nulls as nulls, and
    in arrow (GX copies the frame for most metrics: Python strings cost a reference count each)."""
    frame = row_frame(pa.table({"request_id": pa.array(["r1", None, "r3"]), "n": pa.array([1, None, 3])}))
    assert frame["request_id"].dtype == pd.StringDtype("pyarrow") and frame["request_id"].isna().tolist() == [False, True, False]
    assert frame["n"].dtype == pd.Int64Dtype()


class _CountingFile:
    """A real file whose reads are counted (what a share of the row checks decodes)."""

    def __init__(self, path: Path):
        self._f = open(path, "rb")
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self._f, name)


@pytest.mark.parametrize("group_rows", [7, 10, 23, 100, 1000])
@pytest.mark.parametrize("shares", [2, 3])
def test_shares_are_runs_of_the_whole_tables_batches(tmp_path: Path, group_rows: int, shares: int):
    """Each share of a table's row checks is a run of consecutive batches; together, in order, they
    are the batches one process makes (same boundaries, same rows), whatever the file's row groups."""
    import pyarrow.parquet as pq
    from validation.batches import RowBatches

    table = pa.table({"user_id": [f"u{i}" for i in range(103)], "n": pa.array(range(103), pa.int64())})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=group_rows)
    for source in (Source("t", tmp_path / "t.parquet"), Source("t", table=table)):
        whole = RowBatches(source, chunk_rows=10)
        parts = [whole((k, shares)) for k in range(shares)]
        indexes = [list(whole.indexes((k, shares))) for k in range(shares)]
        assert sum(indexes, []) == list(range(whole.count)) == list(range(11))
        got = [frame for part in parts for frame in part]
        want = list(whole())
        assert [len(f) for f in got] == [len(f) for f in want] == [10] * 10 + [3]
        for a, b in zip(got, want):
            pd.testing.assert_frame_equal(a, b)
    # an empty table still gives one (empty) frame, so that its column checks run
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    for source in (Source("t", tmp_path / "empty.parquet"), Source("t", table=table.slice(0, 0))):
        assert [len(f) for f in RowBatches(source, chunk_rows=10)()] == [0]


def test_a_share_decodes_only_its_part_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With two workers, each reads about half of a large table's file (the training-set check at
    10M examples: every worker used to decode all of it), the row groups at its edges aside."""
    import pyarrow.parquet as pq
    import validation.batches as batches
    from models.parquet_stream import READ_BUFFER_BYTES

    rng = np.random.default_rng(0)
    table = pa.table({"x": rng.random(40_000), "s": [f"id{v}" for v in rng.integers(0, 10**9, 40_000)]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=2_500, compression="none")
    opened: list[_CountingFile] = []

    def counted(p, **options):
        opened.append(_CountingFile(Path(p)))
        return pq.ParquetFile(opened[-1], pre_buffer=False, buffer_size=READ_BUFFER_BYTES, **options)

    monkeypatch.setattr(batches, "open_stream", counted)
    checks = batches.RowBatches(Source("t", path), chunk_rows=5_000)
    size = path.stat().st_size
    for k in range(2):
        assert sum(len(f) for f in checks((k, 2))) == 20_000
        assert opened[-1].read_bytes < 0.6 * size, (k, opened[-1].read_bytes, size)
    assert sum(len(f) for f in checks()) == 40_000 and opened[-1].read_bytes > 0.9 * size
