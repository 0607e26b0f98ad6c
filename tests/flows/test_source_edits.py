"""The flow re-ingests a source directory whose files were edited under the same params.

Its own module (not test_pipeline.py) so a pytest-xdist worker runs it beside the flow's run.
"""
from __future__ import annotations

from flows.pipeline import run_pipeline
from tests.project import make_project


def test_edited_source_directory_is_reingested(tmp_path, contract_source, prefect_harness):
    """DVC tracks the data params, not the files of the source directory: the flow notices edited
    files and re-ingests; unchanged files are left alone."""
    import shutil

    import pandas as pd

    source = tmp_path / "source"
    shutil.copytree(contract_source, source)
    root = make_project(tmp_path / "proj", source)
    first = run_pipeline(root, stages=("ingest",))
    inter = pd.read_parquet(source / "interactions.parquet")
    inter.iloc[:-7].to_parquet(source / "interactions.parquet", index=False)   # same params
    second = run_pipeline(root, stages=("ingest",))
    third = run_pipeline(root, stages=("ingest",))
    assert [r.ran for r in (*first, *second, *third)] == [True, True, False]
    assert len(pd.read_parquet(root / "data/ingested/interactions.parquet")) == len(inter) - 7
