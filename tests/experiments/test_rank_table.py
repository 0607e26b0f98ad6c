"""The ranking table (flows/experiments/rank_table.py): a few cells × two seeds on tiny simulated logs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.datagen import make_contract_dataset

from flows.experiments.rank_table import LIGHTGBM, LOGGED, Cell, cells, gains, markdown, rank_table
from flows.params import DataParams, Params, SimulatorParams
from flows.stages.ingest import ingest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    root = tmp_path_factory.mktemp("table")
    source = make_contract_dataset(root / "source", n_users=120, n_items=80, seed=3)
    sim = SimulatorParams(candidates=30, ranked=15, shown=8)
    ingest(DataParams(source=str(source), ranking_logs="none"), sim, 0, root / "cache", root / "ingested")
    raw = Params().model_dump(mode="json")
    raw["paths"] = {k: str(root / Path(v).name) for k, v in raw["paths"].items()}
    raw["simulator"] = sim.model_dump(mode="json")
    raw["rank"].update(epochs=1, lightgbm_rounds=5, hidden=[16])
    return root, Params.model_validate(raw)


def test_the_table_averages_seeds_per_setting(project: tuple[Path, Params]) -> None:
    root, params = project
    only = [(Cell(2.0, 0.0, seed), ["naive", "pal", "mixture", LIGHTGBM]) for seed in (0, 1)]
    only.append((Cell(2.0, 0.0, 0, redraw=1.0), ["naive", "pal"]))
    only.append((Cell(1.0, 0.0, 0, gamma=0.5, grid=4), ["xpa"]))
    lines: list[str] = []
    summary = rank_table(params, root, root / "reports", [0, 1], request_fraction=0.5, log=lines.append,
                         only=only)

    assert len(summary["runs"]) == 4 and len(lines) == 4
    assert json.loads((root / "reports" / "ranking_table.json").read_text()) == summary
    cell = summary["table"]["η=2, logger=0"]
    assert set(cell) == {"naive", "pal", "mixture", LIGHTGBM, LOGGED}
    ndcg = cell["pal"]["ndcg@10"]
    values = [r["rows"]["pal"]["ndcg@10"] for r in summary["runs"][:2]]
    assert ndcg["n"] == 2 and ndcg["mean"] == pytest.approx(sum(values) / 2)
    assert -1.0 <= cell["pal"]["pearson"]["mean"] <= 1.0         # one epoch: measured, not yet good
    assert "pearson" not in cell["naive"] and "click_loglik" not in cell["mixture"]
    grid = summary["table"]["η=1, logger=0, γ=0.5 grid 4 wide"]
    assert set(grid) == {"xpa", LOGGED}
    # the persistence axis: the same world with the logger's error redrawn is its own setting
    redrawn = summary["table"]["η=2, logger=0, errors redrawn"]
    assert set(redrawn) == {"naive", "pal", LOGGED}
    assert redrawn["pal"]["ndcg@10"]["mean"] != cell["pal"]["ndcg@10"]["mean"]
    gain = gains(summary)["η=2, logger=0"]["pal"]["ndcg@10"]
    assert gain["mean"] == pytest.approx(ndcg["mean"] - cell["naive"]["ndcg@10"]["mean"])

    text = (root / "reports" / "ranking_table.md").read_text()
    assert text == markdown(summary)
    pal = next(line for line in text.splitlines() if line.startswith("| pal |"))
    assert f"{ndcg['mean']:.3f} ± {ndcg['std']:.3f}" in pal and pal.count("–") == 0   # measured columns only
    assert "error redrawn per request" in text and "| η=2, logger=0, errors redrawn |" in text
    assert "| dot |" not in text                                                          # rows not measured


def test_the_default_table_crosses_persistent_and_redrawn_loggers() -> None:
    every = cells([1, 2])
    main = {(c.eta, c.strength, c.redraw) for c, _ in every if not c.gamma}
    assert main == {(e, s, r) for e in (0.5, 1.0, 2.0) for s in (0.0, 0.5, 1.0) for r in (0.0, 1.0)}
    assert all(c.redraw == 0.0 for c, _ in every if c.gamma)
    small = cells([1], etas=(1.0,), strengths=(0.5,), redraws=(0.0,), rows=["naive", "pal"], neighbour=False)
    assert [(c.setting, rows) for c, rows in small] == [("η=1, logger=0.5", ["naive", "pal"])]
