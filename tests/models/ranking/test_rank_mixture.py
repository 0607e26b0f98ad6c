"""Mixture-EM with K = 2 on a log of two user types (patient eta = 0.5, impatient eta = 2): each type
ends up mostly in its own component, and each component's curve follows its type's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.models.ranking.rank_simulator import SimConfig, read_split, simulate

from models.ranking import evaluate
from models.ranking.mixture import MixtureEM
from models.ranking.params import RankParams
from models.ranking.train import build_model, fit

torch.set_num_threads(1)
PATIENT, IMPATIENT = 0, 1


def test_mixture_em_separates_two_user_types(tmp_path_factory: pytest.TempPathFactory) -> None:
    params = RankParams(epochs=5, mixture_k=2, mixture_alpha=2.0)
    sim = simulate(SimConfig(etas=(0.5, 2.0), requests=4000, seed=0))
    split = read_split(sim, tmp_path_factory.mktemp("types"), params)
    model = build_model("mixture", split.config, split.features, seed=0)
    assert isinstance(model, MixtureEM)
    fit(model, split.train, params, seed=0)
    truth = {t: c[:10] for t, c in sim.curves.items()}
    report = evaluate.mixture_report(model, split.test, list(range(1, 11)), truth)
    for row in report:
        print({k: np.round(v, 3).tolist() if k == "curve" else v for k, v in row.items()})
    # each type's requests go mostly to one component, and not the same one
    home = {t: max(report, key=lambda r: r["share_of_type"][t])["component"] for t in truth}
    assert home[PATIENT] != home[IMPATIENT]
    for t, k in home.items():
        assert report[k]["share_of_type"][t] >= 0.65
        assert report[k]["pearson_by_type"][t] >= 0.9
    # the patient users' component examines deeper
    patient, impatient = (np.array(report[home[t]]["curve"]) for t in (PATIENT, IMPATIENT))
    assert patient[1:].mean() > 3 * impatient[1:].mean()
