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
