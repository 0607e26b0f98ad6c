"""The ablation runner (flows/experiments/ablation.py): rows × seeds on tiny data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training_data import synthetic_training_dir


def test_ablation_runner_writes_a_mean_std_table(tmp_path):
    """Two rows + one row whose param does not exist, 1 epoch, 2 seeds, on tiny synthetic data."""
    import shutil

    from flows.params import Params
    from flows.experiments.ablation import AblationRow, ablate

    training, schema = synthetic_training_dir(tmp_path / "data", n_users=80, n_items=60, with_logs=True)
    ingested = tmp_path / "data" / "ingested"   # what sample/train read besides data/training
    ingested.mkdir()
    shutil.move(schema, ingested / "schema.json")
    shutil.copy(tmp_path / "data" / "source" / "ranking_logs.parquet", ingested / "ranking_logs.parquet")
    raw = Params().model_dump(mode="json")
    raw["paths"].update(ingested="data/ingested", training="data/training")
    raw["model"].update(dim=8, embedding_dim=8, hidden=[8])
    raw["train"].update(epochs=1, batch_size=128, threads=1)
    raw["evaluate"].update(ks=[20], ease_lambdas=[10.0, 100.0])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rows = [AblationRow("baseline"), AblationRow("no_logq", ["train.logq=false"]),
            AblationRow("future", ["train.no_such_knob=1"]), AblationRow("same", ["train.logq=true"])]
    logs: list[str] = []
    summary = ablate(raw, tmp_path, tmp_path / "reports", seeds=[0, 1], rows=rows, log=logs.append)

    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "reports" not in p.parts) == before
    saved = json.loads((tmp_path / "reports" / "ablation.json").read_text())
    assert saved == summary
    ok = {r["name"]: r for r in summary["rows"] if r["status"] == "ok"}
    assert set(ok) == {"baseline", "no_logq"}
    for row in ok.values():
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for c in ("recall", "ndcg", "tail_recall", "train_seconds"):
            values = [r[c] for r in row["runs"]]
            assert row["mean"][c] == pytest.approx(np.mean(values), abs=1e-6)
            assert row["std"][c] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
    # seeds change the model: the two runs of a row differ
    assert ok["baseline"]["runs"][0]["ndcg"] != ok["baseline"]["runs"][1]["ndcg"]
    skipped = next(r for r in summary["rows"] if r["name"] == "future")
    assert skipped["status"] == "skipped" and "no_such_knob" in skipped["reason"]
    same = next(r for r in summary["rows"] if r["name"] == "same")
    assert same["status"] == "skipped" and "baseline" in same["reason"]
    assert set(summary["baselines"]) >= {"most_popular", "ease", "ease_lambda"}

    table = (tmp_path / "reports" / "ablation.md").read_text()
    assert "| row | overrides | R@20 | NDCG@20 | tail R@20 | train s |" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| no_logq "))
    assert line.count(" ± ") == 4 and "`train.logq=false`" in line
    assert "| future |" in table and "skipped" in table
    assert any(ln.startswith("| ease (λ=") for ln in table.splitlines())


def test_default_ablation_rows_name_existing_params():
    from flows.params import Params, apply_overrides, validate_params
    from flows.experiments.ablation import default_rows

    raw = Params().model_dump(mode="json")
    rows = default_rows(Params())
    assert rows[0].name == "baseline" and len({r.name for r in rows}) == len(rows)
    for row in rows:
        validate_params(apply_overrides(raw, row.overrides), origin=row.name)  # raises on an unknown key
