"""sample stage: deterministic by seed, popular items down-sampled, hard-negative column attached."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.errors import DataContractError, MissingStageInput
from models.params import SampleParams
from training_data import retrieved_logs, run_sample, synthetic_training_dir


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> Path:
    return synthetic_training_dir(tmp_path_factory.mktemp("synthetic"))[0]


def test_sample_is_deterministic_and_downsamples_popular_items(training, tmp_path):
    sample_cfg = SampleParams(popular_threshold=0.005)
    a = run_sample(training, tmp_path / "a", sample_cfg, 7)
    b = run_sample(training, tmp_path / "b", sample_cfg, 7)
    run_sample(training, tmp_path / "c", sample_cfg, 8)
    assert a == b
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a/full.parquet"),
                                  pd.read_parquet(tmp_path / "b/full.parquet"))
    assert not pd.read_parquet(tmp_path / "a/full.parquet").equals(pd.read_parquet(tmp_path / "c/full.parquet"))

    examples = pd.read_parquet(training / "examples.parquet")
    train_part = pd.read_parquet(tmp_path / "a/train.parquet")
    assert set(train_part["split"]) == {"train"}
    assert a["train"]["rows"] == int((examples["split"] == "train").sum())
    assert a["full"]["kept"] + a["full"]["dropped"] == len(examples)
    assert list(train_part.columns) == [*examples.columns, "hard_negatives"]

    # the most popular item loses a larger share of its positives than a rare one
    full = pd.read_parquet(tmp_path / "a/full.parquet")
    before, after = examples["item_id"].value_counts(), full["item_id"].value_counts()
    kept_share = after.reindex(before.index, fill_value=0) / before
    assert kept_share.iloc[0] < 0.6
    assert (kept_share[before <= 3] == 1.0).all()


def test_sample_names_missing_inputs(training, tmp_path):
    with pytest.raises(MissingStageInput, match="examples.parquet: not found; run the materialize stage"):
        run_sample(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(DataContractError, match="logs.parquet: not found; the ingest stage always writes it"):
        run_sample(training, tmp_path / "out", SampleParams(hard_negatives=2), ranking_logs=tmp_path / "logs.parquet")


def test_streamed_sampling_draws_what_one_pass_draws(training, tmp_path, monkeypatch):
    """The streams are written a batch of rows at a time and their hard negatives drawn a chunk of
    kept rows at a time (10M examples held whole took 13.2 GB); tiny batches and chunks give the same
    files, row for row and negative for negative, as one pass over everything."""
    from models import sampling
    from models.negatives import load_negative_pool

    logs = retrieved_logs(training, tmp_path / "logs.parquet")
    cfg = SampleParams(popular_threshold=0.005, hard_negatives=4)
    whole = sampling.write_sampled_streams(cfg, 3, training / "examples.parquet",
                                           load_negative_pool(logs), tmp_path / "whole", read_rows=10**9)
    monkeypatch.setattr(sampling, "DRAW_ROWS", 37)
    parts = sampling.write_sampled_streams(cfg, 3, training / "examples.parquet",
                                           load_negative_pool(logs), tmp_path / "parts", read_rows=101)
    assert whole == parts and whole["full"]["examples_with_hard_negatives"] > 0
    assert whole["full"]["dropped"] > 0 and whole["train"]["kept"] < whole["full"]["kept"]
    for name in ("train.parquet", "full.parquet"):
        a, b = pd.read_parquet(tmp_path / "whole" / name), pd.read_parquet(tmp_path / "parts" / name)
        assert len(a) > 300
        assert a.drop(columns=["hard_negatives"]).equals(b.drop(columns=["hard_negatives"]))
        assert [list(v) for v in a["hard_negatives"]] == [list(v) for v in b["hard_negatives"]]
    assert not list((tmp_path / "parts").glob(".*partial"))      # written beside, then moved in

    # batches holding no row of a stream (the test rows first: the train stream's first batches)
    examples = pd.read_parquet(training / "examples.parquet")
    (tmp_path / "reordered").mkdir()
    examples.sort_values("split", kind="stable").to_parquet(tmp_path / "reordered" / "examples.parquet")
    assert examples.sort_values("split")["split"].iloc[0] == "test" and (examples["split"] == "test").sum() > 101
    out = sampling.write_sampled_streams(cfg, 3, tmp_path / "reordered" / "examples.parquet",
                                         load_negative_pool(logs), tmp_path / "reordered_out", read_rows=101)
    assert out["train"]["rows"] == whole["train"]["rows"]
    assert len(pd.read_parquet(tmp_path / "reordered_out" / "train.parquet")) == out["train"]["kept"]
