"""flows/experiments/refit_bench.py: the refit protocol one step back, on synthetic contract data."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from flows.experiments.refit_bench import main, pseudo_project
from models.params import SplitParams
from training_data import run_sample, synthetic_training_dir


def _project(root: Path) -> Path:
    """root/data laid out as a project's data folder after the sample stage."""
    training, schema = synthetic_training_dir(root)
    data = root / "data"
    (data / "ingested").mkdir(parents=True)
    shutil.copytree(training, data / "training")
    shutil.copy(schema, data / "ingested/schema.json")
    run_sample(data / "training", data / "samples")
    return data


def test_the_pseudo_project_holds_out_each_users_last_training_rows(tmp_path):
    data = _project(tmp_path)
    sizes = pseudo_project(data, SplitParams(), tmp_path / "work")
    examples = pd.read_parquet(data / "training/examples.parquet")
    train_part = examples[examples["split"] == "train"]
    pseudo = pd.read_parquet(tmp_path / "work/training/examples.parquet")
    # only the training part: the real held-out rows stay out of every arm's training
    assert len(pseudo) == len(train_part) == sizes["training_rows"] and (examples["split"] == "test").any()
    late = pseudo[pseudo["split"] == "test"]
    assert 0 < len(late) == sizes["late_rows"] < len(pseudo)
    # each user's late rows are their newest
    first_late = late.groupby("user_id")["timestamp"].min()
    last_early = pseudo[pseudo["split"] == "train"].groupby("user_id")["timestamp"].max()
    both = first_late.index.intersection(last_early.index)
    assert len(both) and (first_late[both] >= last_early[both]).all()
    full = pd.read_parquet(tmp_path / "work/samples/full.parquet")
    train = pd.read_parquet(tmp_path / "work/samples/train.parquet")
    assert len(full) == sizes["stream_rows"] == len(pd.read_parquet(data / "samples/train.parquet"))
    assert (full["split"] == "test").sum() == sizes["stream_late_rows"] > 0
    assert len(train) == len(full) - sizes["stream_late_rows"] and (train["split"] == "train").all()


def test_the_bench_scores_base_scratch_and_continue_on_the_real_holdout(tmp_path):
    import json

    data = _project(tmp_path)
    out = tmp_path / "refit.json"
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    main(["--data", str(data), "--params", str(params), "--seeds", "0", "--out", str(out), "--set", "train.epochs=2",
          "--set", "train.threads=1", "--set", "model.dim=16", "--set", "model.hidden=[32]",
          "--set", "model.embedding_dim=16"])
    report = json.loads(out.read_text())
    row = report["seeds"][0]
    assert row["continue_update"]["mode"] == "continue" and row["scratch_fit_processes"] == 1
    for arm in ("base", "scratch", "continue"):
        assert 0 <= row[arm]["recall@20"] <= 1 and 0 <= row[arm]["ndcg@20"] <= 1
    assert report["summary"]["continue ndcg@20"]["mean"] == row["continue"]["ndcg@20"]
