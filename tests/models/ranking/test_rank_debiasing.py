"""Directions that must hold on a strongly biased simulated log (eta = 2, a logging ranker that knows
nothing about relevance): position-aware models rank true relevance better than the naive model, and
they recover the examination curve."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.models.ranking.rank_simulator import SimConfig, SimLog, Split, read_split, simulate

from models.ranking import evaluate, select
from models.ranking.lambdarank import fit_lambdarank
from models.ranking.params import RankParams
from models.ranking.ranker import Ranker
from models.ranking.train import build_model, feature_tables, fit

torch.set_num_threads(1)
PARAMS = RankParams()   # the defaults a user gets
POSITIONS = list(range(1, 11))


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimLog, Split]:
    sim = simulate(SimConfig(etas=(2.0, 2.0), logging_strength=0.0, seed=0))
    return sim, read_split(sim, tmp_path_factory.mktemp("biased"), PARAMS)


@pytest.fixture(scope="module")
def fitted(log: tuple[SimLog, Split]) -> dict[str, Ranker]:
    _, split = log
    models = {}
    for name in ("naive", "pal", "additive", "dla"):
        models[name] = build_model(name, split.config, split.features, seed=0)
        fit(models[name], split.train, PARAMS, seed=0)
    return models


def test_bias_aware_models_beat_naive_on_true_relevance(log: tuple[SimLog, Split],
                                                        fitted: dict[str, Ranker]) -> None:
    _, split = log
    ndcg = {name: evaluate.relevance_ndcg(m, split.test, k=10) for name, m in fitted.items()}
    print("NDCG@10 vs true relevance:", ndcg, "logged order:", evaluate.logged_ndcg(split.test))
    assert ndcg["pal"] > ndcg["naive"] + 0.03
    assert ndcg["additive"] > ndcg["naive"] + 0.03


@pytest.mark.parametrize("name", ["pal", "additive", "dla"])   # dla: learned jointly, listwise
def test_recovered_propensities_correlate_with_truth(log: tuple[SimLog, Split],
                                                     fitted: dict[str, Ranker], name: str) -> None:
    sim, split = log
    curve = evaluate.propensity_curve(fitted[name], split.test, POSITIONS)
    recovery = evaluate.propensity_recovery(curve, sim.curves[0][:10])
    print(name, "curve", np.round(curve, 3).tolist(), recovery)
    assert recovery["pearson"] >= 0.9
    assert recovery["mae"] < 0.05
    # the naive model has no position: its curve is flat, nothing to correlate
    flat = evaluate.propensity_curve(fitted["naive"], split.test, POSITIONS)
    assert np.allclose(flat, 1.0)


def test_click_loglik_prefers_the_model_that_knows_position(log: tuple[SimLog, Split],
                                                            fitted: dict[str, Ranker]) -> None:
    _, split = log
    ll = {name: evaluate.click_loglik(m, split.test) for name, m in fitted.items()}
    assert ll["pal"] is not None and ll["naive"] is not None and ll["pal"] > ll["naive"]


def test_lightgbm_lambdarank_with_position_is_a_baseline_row(log: tuple[SimLog, Split]) -> None:
    pytest.importorskip("lightgbm", minversion="4.1")
    _, split = log
    model = fit_lambdarank(split.train, feature_tables(split.features), rounds=30, seed=0)
    ndcg = evaluate.relevance_ndcg(model, split.test)
    print("lightgbm", ndcg)
    assert 0.0 < ndcg <= 1.0
    assert model.train_rows == sum(b.n_examples for b in split.train)


def test_the_debiased_validation_serves_a_bias_model_where_raw_clicks_would_not(
        log: tuple[SimLog, Split], fitted: dict[str, Ranker]) -> None:
    """rank.serve: auto without truth: clicks weighted by the estimated propensities pick what true
    relevance picks; the choice names its metric, figures and the curve it used."""
    _, split = log
    choice = select.choose(fitted, split.test, POSITIONS, truth=None)
    truth = select.choose(fitted, split.test, POSITIONS, truth="relevance")
    print(choice.validation, truth.validation)
    assert choice.metric == "ipw_dcg@10" and truth.metric == "ndcg@10 vs truth"
    assert choice.served in ("pal", "additive") and truth.served in ("pal", "additive")
    assert choice.validation["naive"] < min(choice.validation["pal"], choice.validation["additive"])
    assert choice.estimated_by == "pal" and choice.biased and choice.warning is None
    assert choice.propensity[0] == pytest.approx(1.0) and choice.propensity[-1] < 0.2
    # the same clicks unweighted favour the naive model, which learned the logger's order (0.310 vs 0.301)
    raw = {n: select.ipw_dcg(m, split.test, np.ones(len(POSITIONS))) for n, m in fitted.items()}
    assert raw["naive"] > max(raw["pal"], raw["additive"])


def test_a_naive_model_is_never_served_silently(log: tuple[SimLog, Split], fitted: dict[str, Ranker]) -> None:
    _, split = log
    alone = select.choose({"naive": fitted["naive"]}, split.test, POSITIONS, truth=None)
    assert alone.served == "naive" and alone.propensity is None and "no bias model" in alone.warning
    # a bias model whose relevance tower learned nothing: naive validates best, the clicks are biased
    blank = build_model("pal", split.config, split.features, seed=1)
    blank.bias.load_state_dict(fitted["pal"].bias.state_dict())
    # the weighted clicks (lead 0.196 ± 0.086, clustered by user over ~6 requests of 100 users) and the
    # simulator's truth both measure the naive lead beyond 1.645 standard errors: naive is served, never
    # silently (a lead within the noise: test_on_biased_clicks_a_naive_candidate_within_the_noise_is_not_served)
    for truth in (None, "relevance"):
        choice = select.choose({"naive": fitted["naive"], "pal": blank}, split.test, POSITIONS, truth=truth)
        assert choice.validation["naive"] > choice.validation["pal"] and choice.biased
        assert choice.served == "naive" and "position-biased" in choice.warning
        lead = choice.naive_lead
        assert lead.significant and lead.corrected == "pal" and lead.lead > select.NAIVE_LEAD_Z * lead.standard_error
    assert choice.to_dict()["naive_lead"]["requests"] == lead.requests > lead.users > 1


def test_on_biased_clicks_a_naive_candidate_within_the_noise_is_not_served(
        log: tuple[SimLog, Split], fitted: dict[str, Ranker]) -> None:
    """A naive candidate that validates level with (or a hair above) a corrected one loses the tie:
    the model whose training is consistent under the bias is served, and the comparison is recorded."""
    _, split = log
    twin = build_model("naive", split.config, split.features, seed=1)
    twin.relevance.load_state_dict(fitted["pal"].relevance.state_dict())     # the same ordering as pal
    for truth in (None, "relevance"):
        choice = select.choose({"naive": twin, "pal": fitted["pal"]}, split.test, POSITIONS, truth=truth)
        assert choice.validation["naive"] == pytest.approx(choice.validation["pal"])
        assert choice.served == "pal" and choice.warning is None
        assert choice.naive_lead.naive == "naive" and not choice.naive_lead.significant
    # per-request differences of ±0.1 around a mean lead: half a standard error is noise, three are not
    naive = select.ipw_dcg_per_request(twin, split.test, np.array(choice.propensity))
    swing = np.where(np.arange(len(naive)) % 2, 0.1, -0.1)
    se = 0.1 / np.sqrt(len(naive))
    for lead, served in ((0.5 * se, False), (3 * se, True)):
        measured = select.naive_lead("naive", "pal", {"naive": naive, "pal": naive - swing - lead})
        assert measured.lead == pytest.approx(lead, abs=se / 10) and measured.significant is served


def test_the_naive_lead_counts_users_not_requests() -> None:
    """40 users with 50 requests each, whose per-user leads scatter ±0.02 around 0.004: 2,000 requests
    treated as independent would call the lead certain (z ≈ 8); 40 users do not (z ≈ 1.3)."""
    rng = np.random.default_rng(0)
    per_user = 0.004 + 0.02 * rng.choice([-1.0, 1.0], 40)
    per_user += 0.004 - per_user.mean()                          # exactly 0.004 on average
    users = np.repeat(np.arange(40), 50)
    diff = per_user[users] + rng.normal(0, 0.001, len(users))
    corrected = np.full(len(users), 0.5)
    figures = {"naive": corrected + diff, "pal": corrected}
    alone = select.naive_lead("naive", "pal", figures)
    clustered = select.naive_lead("naive", "pal", figures, users)
    assert alone.significant and alone.users == 2000
    assert not clustered.significant and clustered.users == 40 and clustered.requests == 2000
    assert clustered.standard_error == pytest.approx(0.02 / np.sqrt(40), rel=0.1)
    assert clustered.to_dict()["users"] == 40



def test_without_validation_requests_a_bias_model_is_served_with_a_warning(fitted: dict[str, Ranker]) -> None:
    choice = select.choose(fitted, [], POSITIONS, truth="relevance")
    assert choice.served == "pal" and choice.metric == "none" and "no validation requests" in choice.warning


def test_the_propensity_curve_runs_the_relevance_tower_once_per_batch(fitted: dict[str, Ranker],
                                                                      log: tuple[SimLog, Split]) -> None:
    """propensity_curve reuses a batch's relevance across positions (RelevanceTower.reused): the same
    curve as recomputing it at every position, one tower call per batch, and inside `reused` a call
    with other tensors is computed afresh."""
    _, split = log
    model = fitted["pal"]
    batches = list(split.test)
    calls = []
    hook = model.relevance.head.register_forward_hook(lambda *_: calls.append(1))   # once per tower run
    try:
        curve = evaluate.propensity_curve(model, batches, POSITIONS)
    finally:
        hook.remove()
    assert len(calls) == len(batches)
    with torch.no_grad():
        again = np.zeros(len(POSITIONS) + 1)
        for b in batches:
            for j, p in enumerate([1, *POSITIONS]):
                again[j] += float((model.log_click(b.with_position(p))[0].exp() * b.mask).sum())
    np.testing.assert_array_equal(curve, again[1:] / again[0])
    first, second = batches[0], batches[1]
    with torch.no_grad(), model.relevance.reused():
        model.ranking_scores(first)
        inside = model.ranking_scores(second)
    with torch.no_grad():
        assert torch.equal(inside, model.ranking_scores(second))


def test_both_lightgbm_variants_on_one_binned_matrix_are_the_separate_fits(log: tuple[SimLog, Split]) -> None:
    """The rank stage fits LightGBM with and without its position correction in one job, on one binned
    Dataset (fit_lambdarank_variants): each model is the one its own Dataset gives, tree for tree."""
    pytest.importorskip("lightgbm", minversion="4.1")
    from models.ranking.lambdarank import fit_lambdarank_variants

    _, split = log
    tables = feature_tables(split.features)
    trees = lambda m: m.booster.model_to_string().split("parameters:")[0]          # noqa: E731
    both = fit_lambdarank_variants(split.train, tables, (True, False), rounds=20, seed=0)
    assert [m.position for m in both] == [True, False]
    for model in both:
        alone = fit_lambdarank(split.train, tables, position=model.position, rounds=20, seed=0)
        assert trees(model) == trees(alone) and model.train_rows == alone.train_rows
    assert trees(both[0]) != trees(both[1])                                        # the correction acts
