"""The rank stage end to end on a small simulated log, the skipped case, `towerflow rank score` and
re-ranking.

The log comes from the ranking library's test simulator (eta = 2, a logging ranker that knows nothing
about relevance but, like any trained model, orders the same pair the same way every time), written
in the ingested layout the stage reads: ranking_logs.parquet in the contract's form (`stage` column),
items with numeric features only, users without feature columns, and the truth in simulation/.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from tests.models.ranking.rank_simulator import SimConfig, SimLog, simulate
from typer.testing import CliRunner

from flows.cli import app
from flows.serving.rerank import rerank
from flows.stages.rank import rank
from models.errors import ModelNotFound
from models.ranking.bundle import load_ranker
from models.ranking.ensemble import SeedEnsemble
from models.ranking.params import RankParams

torch.set_num_threads(1)
PARAMS = RankParams(models=["naive", "pal", "additive"], serve="pal", lightgbm=False, lightgbm_naive=False, epochs=5)
LOG_COLUMNS = ["request_id", "user_id", "item_id", "stage", "position", "ranker_score", "clicked"]


def write_ingested(sim: SimLog, out: Path) -> Path:
    """sim as ingest would write it: contract tables, schema.json and the simulator's truth."""
    (out / "simulation").mkdir(parents=True)
    logs = sim.logs.assign(stage=np.where(sim.logs["shown"], "shown", "retrieved"))
    logs[LOG_COLUMNS].to_parquet(out / "ranking_logs.parquet", index=False, row_group_size=5000)
    sim.items.to_parquet(out / "items.parquet", index=False)
    pd.DataFrame({"user_id": sorted(sim.logs["user_id"].unique())}).to_parquet(out / "users.parquet")
    numeric = [c for c in sim.items.columns if c != "item_id"]
    (out / "schema.json").write_text(json.dumps({
        "user_id_dtype": "string", "item_id_dtype": "int64", "ranking_logs": "simulated", "log_context": [],
        "user_features": {"categorical": [], "numeric": [], "multi": []},
        "item_features": {"categorical": [], "numeric": numeric, "multi": []}}))
    shown = sim.logs[sim.logs["shown"]]
    pd.DataFrame({"request_id": shown["request_id"], "item_id": shown["item_id"],
                  "user_type": "type" + shown["user_type"].astype(str), "p_relevant": shown["relevance"],
                  "p_examine_position": shown["p_examine"]}).to_parquet(out / "simulation" / "truth.parquet")
    curves = {f"type{t}": c.tolist() for t, c in sim.curves.items()}
    (out / "simulation" / "truth.json").write_text(json.dumps({"propensity": curves}))
    return out


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rank")
    ingested = write_ingested(simulate(SimConfig(etas=(2.0, 2.0), logging_strength=0.0, seed=0)),
                              root / "ingested")
    report = rank(PARAMS, 0, ingested, None, root / "ranker", root / "reports" / "ranking.json")
    return root, report


def test_bias_aware_models_beat_naive_and_recover_the_propensities(ranked: tuple[Path, dict]) -> None:
    root, report = ranked
    rows = report["models"]
    print({name: (row["ndcg@10"], row.get("propensity")) for name, row in rows.items()})
    assert report["status"] == "ok" and report["ndcg_vs"] == "simulation"
    for name in ("pal", "additive"):
        assert rows[name]["ndcg@10"] > rows["naive"]["ndcg@10"] + 0.03
        assert rows[name]["propensity"]["pearson"] >= 0.9
        assert rows[name]["click_loglik"] > rows["naive"]["click_loglik"]
    assert report["examples_per_s"] > 0 and report["log"]["positions"] == 16
    assert json.loads((root / "reports" / "ranking.json").read_text()) == report


def test_the_report_splits_seen_and_unseen_and_says_what_the_tower_read(ranked: tuple[Path, dict]) -> None:
    root, report = ranked
    split = report["models"]["pal"]["split"]
    assert set(split) == {"items_seen", "items_unseen", "users_seen", "users_unseen"}
    # 120 items, 3,000 requests: every item and user is in training, so all held-out ones are seen
    assert split["users_seen"]["requests"] == report["log"]["test_requests"] and split["users_unseen"]["requests"] == 0
    assert split["users_seen"]["ndcg@10"] == pytest.approx(report["models"]["pal"]["ndcg@10"])
    features = report["relevance_features"]
    assert features["id_embeddings"] is True and features["features_only"] == "auto"   # items repeat: ids learned
    assert features["item_numeric"] == [f"f{j}" for j in range(6)] and features["median_item_impressions"] > 100
    assert load_ranker(root / "ranker").meta["numeric_scaling"]["method"] == "quantile"


def test_serve_auto_chooses_by_the_truth_on_validation_requests(tmp_path: Path) -> None:
    """rank.serve: auto (the default) on simulated logs: validation requests apart from training and
    test, every model's true NDCG@10 there, the best served and recorded in ranking.json and ranker.json."""
    sim = simulate(SimConfig(etas=(2.0, 2.0), logging_strength=0.0, requests=1500, n_users=300, seed=2))
    ingested = write_ingested(sim, tmp_path / "ingested")
    cfg = RankParams(models=["naive", "pal"], lightgbm=False, lightgbm_naive=False, epochs=3)
    assert cfg.serve == "auto"
    report = rank(cfg, 0, ingested, None, tmp_path / "ranker", tmp_path / "ranking.json")
    serve = report["serve"]
    print(serve)
    assert serve["mode"] == "auto" and serve["metric"] == "ndcg@10 vs truth" and set(serve["validation"]) == {"naive", "pal"}
    assert report["served"] == serve["served"] == max(serve["validation"], key=serve["validation"].get) == "pal"
    assert serve["position_biased"] and serve["propensity_from"] == "pal" and serve["warning"] is None
    assert load_ranker(tmp_path / "ranker").meta["chosen_by"] == serve
    # validation requests are neither trained on nor tested on: fewer training examples than with serve named
    named = rank(cfg.model_copy(update={"serve": "pal"}), 0, ingested, None, tmp_path / "r2", tmp_path / "r2.json")
    assert {k: named["serve"][k] for k in ("mode", "served")} == {"mode": "named", "served": "pal"}
    assert named["serve"]["ensemble"]["members"] == 3          # a named network is served as a seed ensemble too
    assert named["log"]["test_requests"] == report["log"]["test_requests"]
    # validation by user (300 users: ~30 validation users, enough for auto): training never saw them,
    # so the users of auto's training and of its validation partition the named model's training users
    split = serve["validation_split"]
    assert split["by"] == "user" and split["fraction"] == 0.1 and split["log_users"] == 300 and split["users"] >= 15
    trained_users = report["relevance_features"]["training_users"]
    assert trained_users + split["users"] == named["relevance_features"]["training_users"]
    assert report["models"]["pal"]["fit"]["examples"] < 0.95 * named["models"]["pal"]["fit"]["examples"]
    assert report["models"]["pal"]["fit"]["valid_losses"] == []                     # early stopping is opt-in
    stopped = rank(cfg.model_copy(update={"models": ["pal"], "patience": 1}), 0, ingested, None,
                   tmp_path / "r3", tmp_path / "r3.json")["models"]["pal"]["fit"]
    assert len(stopped["valid_losses"]) == stopped["epochs"] and stopped["best_epoch"] >= 1


def test_dla_trains_at_its_own_learning_rate(ranked: tuple[Path, dict], tmp_path: Path) -> None:
    """rank.dla_lr: the dual learning algorithm's inverse-weighted clicks train at their own lr, the other
    models at rank.lr; each row's fit says which."""
    root, _ = ranked
    cfg = PARAMS.model_copy(update={"models": ["naive", "dla"], "serve": "dla", "epochs": 1})
    rows = rank(cfg, 0, root / "ingested", None, tmp_path / "ranker", tmp_path / "ranking.json")["models"]
    assert rows["dla"]["fit"]["lr"] == cfg.dla_lr == 0.003 and rows["naive"]["fit"]["lr"] == cfg.lr == 0.01


def test_the_served_ranker_scores_with_its_relevance_tower(ranked: tuple[Path, dict]) -> None:
    root, report = ranked
    bundle = load_ranker(root / "ranker")
    ensemble = report["serve"]["ensemble"]
    assert bundle.name == "pal" and bundle.meta["ndcg@10"] == ensemble["ndcg@10"]
    scores = bundle.score(np.array(["u1", "u1", "nobody"]), np.array([3, 4, 10**9]))
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert scores[0] != scores[1]


def test_the_served_network_is_the_mean_of_fits_from_several_seeds(ranked: tuple[Path, dict]) -> None:
    """rank.serve_ensemble (3 by default): the served network's score is the mean of three fits of its
    kind from seeds 0, 1, 2, the first being the fit that was chosen; ranking.json measures the mean."""
    root, report = ranked
    ensemble = report["serve"]["ensemble"]
    assert PARAMS.serve_ensemble == 3 and ensemble["model"] == report["served"] == "pal"
    assert ensemble["members"] == 3 and ensemble["seeds"] == [0, 1, 2]
    assert 0 < ensemble["ndcg@10"] <= 1 and set(ensemble["split"]) == set(report["models"]["pal"]["split"])
    bundle = load_ranker(root / "ranker")
    assert bundle.meta["members"] == 3 and isinstance(bundle.model, SeedEnsemble)
    users, items = torch.tensor([1, 1, 2, 0]), torch.tensor([3, 4, 5, 6])
    with torch.no_grad():
        each = torch.stack([m.score(users, items) for m in bundle.model.members])     # (3, 4)
        assert torch.allclose(bundle.model.score(users, items), each.mean(dim=0))
    assert not torch.allclose(each[0], each[1])                   # other seeds: other weights
    # the feature tables are shared by the members, saved once
    tables = {m.relevance.item_numeric.data_ptr() for m in bundle.model.members}
    assert len(tables) == 1


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items()
                if k not in ("seconds", "examples_per_s", "fit_seconds", "fit_workers", "phase_seconds")}
    return [_without_timings(v) for v in value] if isinstance(value, list) else value


def test_fits_in_two_processes_give_what_one_after_another_gives(tmp_path: Path) -> None:
    """rank.workers: the candidates (networks and LightGBM) and the served network's extra seeds fit in
    two forked processes, and the report and the saved ranker are what one process fitting them one
    after another gives, to the last digit."""
    pytest.importorskip("lightgbm", minversion="4.1")
    ingested = write_ingested(simulate(SimConfig(etas=(2.0, 2.0), logging_strength=0.0, requests=1500, seed=5)),
                              tmp_path / "ingested")
    # both LightGBM variants (the defaults): one job, one binned matrix
    cfg = RankParams(models=["pal", "mixture"], epochs=2, lightgbm_rounds=20)
    runs = {}
    for workers in (2, 1):
        out = tmp_path / f"w{workers}"
        runs[workers] = rank(cfg.model_copy(update={"workers": workers}), 0, ingested, None, out / "ranker",
                             out / "ranking.json")
        assert runs[workers]["fit_workers"] == workers
    assert _without_timings(runs[2]) == _without_timings(runs[1])
    assert set(runs[2]["models"]) == {"pal", "mixture", "lightgbm", "lightgbm_naive"}
    assert [runs[2]["models"][m]["position_correction"] for m in ("lightgbm", "lightgbm_naive")] == [True, False]
    assert runs[2]["serve"]["ensemble"]["members"] == 3
    two, one = (load_ranker(tmp_path / f"w{w}" / "ranker") for w in (2, 1))
    if two.name == "lightgbm":
        assert two.model.booster.model_to_string() == one.model.booster.model_to_string()
    else:
        a, b = two.model.state_dict(), one.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_pass_reads_the_encoded_splits_and_the_report_is_what_the_file_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rank_data encodes the train, test and validation splits once (models/ranking/encoded.py) and the
    fits, measures and the choice read them; the report is, to the last digit, what re-reading the
    prepared file on every pass gives. Other rank params than the encoded ones read the file."""
    from flows.stages import rank as stage
    from models.ranking.data import RankingLog
    from models.ranking.encoded import EncodedLog

    ingested = write_ingested(simulate(SimConfig(etas=(2.0, 2.0), logging_strength=0.0, requests=1200, seed=6)),
                              tmp_path / "ingested")
    cfg = RankParams(models=["pal", "naive"], epochs=2, lightgbm=False, lightgbm_naive=False, read_rows=3000)
    data = stage.rank_data(cfg, ingested / "ranking_logs.parquet", ingested / "simulation",
                           stage.item_table(ingested, json.loads((ingested / "schema.json").read_text())),
                           None, tmp_path)
    assert data is not None and all(isinstance(data.log(cfg, s), EncodedLog) for s in ("train", "test", "valid"))
    assert isinstance(data.log(cfg.model_copy(update={"batch_requests": 64}), "train"), RankingLog)
    encoded = rank(cfg, 0, ingested, None, tmp_path / "a" / "ranker", tmp_path / "a" / "ranking.json")
    monkeypatch.setattr(stage, "encode_splits", lambda logs, directory: dict(logs))   # each pass reads the file
    from_file = rank(cfg, 0, ingested, None, tmp_path / "b" / "ranker", tmp_path / "b" / "ranking.json")
    assert _without_timings(encoded) == _without_timings(from_file)
    assert encoded["serve"]["ensemble"]["members"] == 3


def test_a_large_log_gets_fewer_epochs_within_max_steps(ranked: tuple[Path, dict], tmp_path: Path) -> None:
    """rank.max_steps: where rank.epochs passes would take more optimizer steps, the fit makes the whole
    passes that fit (at least one) and its row says why; the default leaves this small log all its epochs."""
    root, report = ranked
    full = report["models"]["pal"]["fit"]
    assert full["epochs"] == PARAMS.epochs == 5 and full["epochs_cut"] is None and PARAMS.max_steps == 8000
    cfg = PARAMS.model_copy(update={"models": ["pal"], "max_steps": 25})
    cut = rank(cfg, 0, root / "ingested", None, tmp_path / "ranker", tmp_path / "ranking.json")["models"]["pal"]["fit"]
    steps = int(cut["epochs_cut"].split(": ")[1].split(" steps")[0])
    assert cut["epochs"] == max(1, 25 // steps) < 5 and cut["examples"] * 5 == full["examples"] * cut["epochs"]
    assert cut["epochs_cut"] == f"{cut['epochs']} of rank.epochs 5: {steps} steps an epoch, rank.max_steps 25"


def test_a_log_without_rows_is_skipped_not_an_error(tmp_path: Path) -> None:
    sim = simulate(SimConfig(requests=5, seed=1))
    ingested = write_ingested(SimLog(logs=sim.logs.iloc[:0], items=sim.items, curves=sim.curves),
                              tmp_path / "ingested")
    report = rank(PARAMS, 0, ingested, None, tmp_path / "ranker", tmp_path / "ranking.json")
    assert report["status"] == "skipped" and "no ranking logs" in report["reason"]
    with pytest.raises(ModelNotFound, match="no ranker was trained"):
        load_ranker(tmp_path / "ranker")


def _params_file(root: Path) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"paths": {"ingested": str(root / "ingested"),
                                              "ranker": str(root / "ranker")}}))
    return path


def rank_score_cli(root: Path, tmp_path: Path, pairs_csv: str) -> pd.DataFrame:
    """`towerflow rank score` of the pairs (CSV text) with the ranker in root; its scores file."""
    pairs, out = tmp_path / "pairs.csv", tmp_path / "scores.csv"
    pairs.write_text(pairs_csv)
    result = CliRunner().invoke(app, ["rank", "score", "--pairs", str(pairs), "--out", str(out),
                                      "--params", str(_params_file(root))])
    assert result.exit_code == 0, result.output
    return pd.read_csv(out)


@pytest.mark.parametrize("text, message", [
    ("user,item\nu1,3\n", ":1: the header must be 'user_id,item_id'"),
    ("user_id,item_id\nu1,3\nu2,x7\n", ":3: item_id 'x7' is not an int64"),
    ("user_id,item_id\nu1,3,9\n", ":2: expected 2 fields"),
    ("user_id,item_id\n", "no pairs after the header"),
])
def test_rank_score_names_the_bad_line(ranked: tuple[Path, dict], tmp_path: Path, text: str,
                                       message: str) -> None:
    root, _ = ranked
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(text)
    result = CliRunner().invoke(app, ["rank", "score", "--pairs", str(pairs), "--out", str(tmp_path / "s.csv"),
                                      "--params", str(_params_file(root))])
    assert result.exit_code == 1
    assert str(pairs) in result.output and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_rank_score_writes_one_score_per_pair(ranked: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = ranked
    scores = rank_score_cli(root, tmp_path, "user_id,item_id\nu1,3\nu2,3\nunknown,5\n")
    assert list(scores.columns) == ["user_id", "item_id", "score"] and len(scores) == 3
    assert list(scores["user_id"]) == ["u1", "u2", "unknown"]


def test_rank_score_says_how_many_pairs_hold_an_id_the_ranker_never_saw(ranked: tuple[Path, dict],
                                                                         tmp_path: Path) -> None:
    """Unknown ids score from the OOV row (cold start), so the command says how many it met: a
    mistyped id file would otherwise give plausible scores and no sign of it."""
    root, _ = ranked
    pairs = tmp_path / "pairs.csv"
    args = ["rank", "score", "--pairs", str(pairs), "--out", str(tmp_path / "s.csv"),
            "--params", str(_params_file(root))]
    pairs.write_text("user_id,item_id\nu1,3\nnobody,3\nu2,999999\nnobody,999999\nu2,4\n")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 pair(s) with a user and 2 with an item the ranker was not trained on" in result.stderr
    assert len(pd.read_csv(tmp_path / "s.csv")) == 5
    pairs.write_text("user_id,item_id\nu1,3\nu2,4\n")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and result.stderr == ""


def test_rerank_keeps_k_per_user_and_changes_the_order(ranked: tuple[Path, dict]) -> None:
    root, _ = ranked
    bundle = load_ranker(root / "ranker")
    users = ["u1", "u7"]
    recs = pd.DataFrame([(u, item, r + 1, 1.0 - r / 100) for u in users for r, item in enumerate(range(30))],
                        columns=["user_id", "item_id", "rank", "score"])
    out = rerank(recs, bundle, k=5)
    assert list(out.columns) == ["user_id", "item_id", "rank", "score", "retrieval_rank"]
    assert out.groupby("user_id").size().to_dict() == {"u1": 5, "u7": 5}
    assert list(out["user_id"].drop_duplicates()) == users
    assert list(out["rank"]) == [1, 2, 3, 4, 5] * 2
    for _, group in out.groupby("user_id"):
        assert group["score"].is_monotonic_decreasing
        assert list(group["retrieval_rank"]) != [1, 2, 3, 4, 5]   # the ranker disagrees with retrieval


def test_the_service_reranks_answers_like_the_cli(ranked: tuple[Path, dict]) -> None:
    from flows.serving.rerank import RankerCache, rerank_answers

    root, _ = ranked
    shutil.copytree(root / "ranker", root / "published" / "versions" / "v1" / "ranker", dirs_exist_ok=True)
    cache = RankerCache(root / "published")
    assert cache.get("v1") is cache.get("v1")                     # loaded once per served version
    answers = [(u, u == "u7", [(item, 1.0 - r / 100) for r, item in enumerate(range(30))]) for u in ("u1", "u7")]
    out = rerank_answers(answers, cache.get("v1"), k=5)
    recs = pd.DataFrame([(u, item, r + 1) for u, _, hits in answers for r, (item, _) in enumerate(hits)],
                        columns=["user_id", "item_id", "rank"])
    cli = rerank(recs, cache.get("v1"), k=5)
    for user, cold, hits in out:
        assert cold == (user == "u7") and len(hits) == 5
        assert [i for i, _ in hits] == cli.loc[cli["user_id"] == user, "item_id"].tolist()


def test_ranker_hard_negatives_keep_the_low_scored_half_of_each_request(ranked: tuple[Path, dict],
                                                                       tmp_path: Path) -> None:
    from flows.experiments.ranker_negatives import ranker_logs

    root, _ = ranked
    logs = root / "ingested" / "ranking_logs.parquet"
    counts = ranker_logs(logs, root / "ranker", tmp_path / "logs.parquet", read_rows=1000)  # requests span reads
    before, after = pd.read_parquet(logs), pd.read_parquet(tmp_path / "logs.parquet")
    assert counts == {"log_rows": len(before), "kept_rows": len(after)}
    assert list(after.columns) == list(before.columns)
    shown = before[before["stage"] == "shown"]
    pd.testing.assert_frame_equal(after[after["stage"] == "shown"].reset_index(drop=True),
                                  shown.reset_index(drop=True))
    per_request = after[after["stage"] != "shown"].groupby("request_id").size()
    assert per_request.max() <= 1   # 3 unshown items per request: only the lowest is below the median
    scores = load_ranker(root / "ranker").score(before["user_id"].to_numpy(), before["item_id"].to_numpy())
    unshown = before.assign(score=scores)[before["stage"] != "shown"]
    lowest = unshown.loc[unshown.groupby("request_id")["score"].idxmin(), "item_id"]
    assert set(after.loc[after["stage"] != "shown", "item_id"]) <= set(lowest)


def test_recommend_rerank_retrieves_the_depth_and_returns_k(ranked: tuple[Path, dict], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI composition only: retrieval (the published index) is replaced by a fixed top-N."""
    import io

    root, _ = ranked
    asked: list[int] = []

    def retrieve(ids: list, k: int, include_seen: bool, **_: object) -> pd.DataFrame:
        asked.append(k)
        # as Recommender.recommend answers: with the cold-start flag per row
        return pd.DataFrame([(u, item, r + 1, 1.0 - r / 100, False) for u in ids for r, item in enumerate(range(k))],
                            columns=["user_id", "item_id", "rank", "score", "cold_start"])

    class Retrieval:          # the live bundle's Recommender, answering with the fixed top-N
        def __enter__(self) -> "Retrieval":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def recommend(self, ids: list, k: int, exclude_seen: bool = True, filter: object = None) -> pd.DataFrame:
            return retrieve(ids, k, not exclude_seen)

    bundle = tmp_path / "versions" / "v1"          # the live bundle: its schema and its ranker
    shutil.copytree(root / "ranker", bundle / "ranker")
    shutil.copy2(root / "ingested" / "schema.json", bundle / "schema.json")
    monkeypatch.setattr("flows.serving.store.BundleStore.live_dir", lambda self: bundle)
    monkeypatch.setattr("flows.serving.recommend.Recommender.load", classmethod(lambda cls, *a, **kw: Retrieval()))
    result = CliRunner().invoke(app, ["recommend", "--user-id", "u1", "--k", "4", "--rerank", "--rerank-depth", "30",
                                      "--params", str(_params_file(root))])
    assert result.exit_code == 0, result.output
    recs = pd.read_csv(io.StringIO(result.output))
    assert asked == [30]
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score", "retrieval_rank", "cold_start"]
    assert list(recs["rank"]) == [1, 2, 3, 4] and recs["retrieval_rank"].max() <= 30


def test_shown_only_logs_with_two_layouts_and_a_context_column(tmp_path: Path) -> None:
    """Real logs: only shown rows, a device column for the bias tower, grid pages beside list pages."""
    sim = simulate(SimConfig(requests=400, unshown=0, devices=True, grid_cols=4, seed=2))
    logs = sim.logs.copy()
    lists = logs["request_id"].str[-1].isin(list("02468"))              # half the requests: a list page
    logs.loc[lists, ["grid_row", "grid_col"]] = None
    ingested = write_ingested(SimLog(logs=logs, items=sim.items, curves=sim.curves), tmp_path / "ingested")
    frame = pd.read_parquet(ingested / "ranking_logs.parquet")
    frame.assign(device=logs["device"], grid_row=logs["grid_row"].astype("Int64"),
                 grid_col=logs["grid_col"].astype("Int64")).to_parquet(ingested / "ranking_logs.parquet")
    cfg = RankParams(models=["naive", "xpa"], serve="xpa", epochs=1, context_columns=["device"],
                     lightgbm=False)
    report = rank(cfg, 0, ingested, None, tmp_path / "ranker", tmp_path / "ranking.json")
    assert report["status"] == "ok" and report["log"]["grid"] is True
    assert report["log"]["context_columns"] == ["device"]
    assert report["log"]["shown_rows"] == len(logs)
    assert load_ranker(tmp_path / "ranker").meta["config"]["grid"] is True


def test_the_stage_stays_on_one_torch_thread_when_its_fits_run_in_forked_processes():
    """A process forked after torch's OpenMP threads ran hangs at its first parallel region on more than
    one thread (libgomp): with rank.threads 2 and rank.workers 2 the stage never ended (the demo's rank
    stage, 84 s now). Its own process keeps one thread whenever the fits are forked."""
    from flows.stages.rank import parent_threads

    assert parent_threads(RankParams(threads=2, workers=2)) == 1
    assert parent_threads(RankParams(threads=2, workers=1)) == 2         # fits here: all its threads
    assert parent_threads(RankParams(threads=1, workers=2)) == 1
    assert parent_threads(RankParams(threads=3, workers=2, models=["naive"], lightgbm=False)) == 1

