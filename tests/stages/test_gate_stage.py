"""The gate between report and publish, on real files in tmp: this run's reports (metrics.json,
champion.json with the live model's figures on this run's holdout as the evaluate stage writes it,
quality.json, drift/summary.json) and a published folder (LIVE + versions/<v>/) holding the live
model's files. tests/stages/test_champion.py runs the real evaluate stage into the gate."""
from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import _force_overrides, app
from flows.errors import ConfigError, MissingStageInput, TowerflowError
from flows.params import DriftLimits, GateParams, load_params
from flows.reports.live import BUNDLE_FILES, bundle_reports, live_bundle
from flows.errors import BLOCKED_EXIT, GateBlocked
from flows.reports.live import require_passed
from flows.stages.gate import gate

ROOT = Path(__file__).resolve().parents[2]
NDCG = 0.25
LIVE = 0.281        # the live model's ndcg@20 on this run's holdout


def _drift(drifted: list[str], n: int = 10) -> dict:
    """A judged comparison as the report stage writes it: the drifted columns above their limit."""
    columns = {c: {"score": 0.4 - 0.1 * i, "natural": [0.01, 0.1], "floor": 0.2, "limit": 0.2, "drifted": True,
                   "verdict": "drifted"} for i, c in enumerate(drifted)}
    return {"drift_share": len(drifted) / n, "n_columns": n, "n_drifted": len(drifted), "drifted_columns": drifted,
            "columns": columns}


def _champion(ndcg: float, live: float | None, change: str | None = None) -> dict:
    """reports/champion.json as the evaluate stage writes it: live v1 scored on this run's holdout."""
    mine = {"ndcg@20": ndcg, "recall@20": 0.2}
    if live is None:
        return {"compared": False, "live_version": None, "reason": "no previous published model", "challenger": mine}
    return {"compared": True, "live_version": "v1", "challenger": mine, "metrics": {"ndcg@20": live, "recall@20": 0.2},
            "n_users": 100, "n_items": 50, "cold_users": 3, "cold_items": 1, "cold_targets": 0,
            "lineage": {"this_run": {"source": "/data/b"}, "live": {"source": "/data/a" if change else "/data/b"},
                        "change": change}}


def _reports(root: Path, live: float | None = LIVE, ndcg: float = NDCG, window: float = 0.1,
             published_share: float | None = 0.0, change: str | None = None) -> Path:
    """This run's reports as evaluate and report write them; live: the live model's ndcg@20 on this
    run's holdout (None: nothing published)."""
    reports = root / "reports"
    (reports / "quality").mkdir(parents=True, exist_ok=True)
    (reports / "drift").mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps({"two_tower": {"ndcg@20": ndcg, "recall@20": 0.2}}))
    (reports / "champion.json").write_text(json.dumps(_champion(ndcg, live, change)))
    quality = {"ndcg@20": ndcg, "novelty@20": 2.5, "k": 20, "users": 100}
    (reports / "quality" / "quality.json").write_text(json.dumps(quality))
    drift = {"window": _drift(["rating", "hour_of_day"] if window > 0.15 else []),
             "published": ({"skipped": "no previous published model"} if published_share is None else
                           _drift(["item_year"] if published_share else []))}
    (reports / "drift" / "summary.json").write_text(json.dumps(drift))
    (reports / "drift" / "reference.parquet").write_bytes(b"PAR1")   # copied as it is
    return reports


def _publish_fake(reports: Path, published: Path, version: str, ndcg: float) -> None:
    """A live bundle as publish builds it: bundle_reports copies this run's files into it."""
    (reports / "gate.json").write_text(json.dumps({"passed": True}))
    bundle = published / "versions" / version
    assert bundle_reports(reports, bundle) == sorted(BUNDLE_FILES.values())
    (published / "LIVE").write_text(json.dumps({"version": version}))
    metrics = json.loads((bundle / "metrics.json").read_text())
    metrics["two_tower"]["ndcg@20"] = ndcg
    (bundle / "metrics.json").write_text(json.dumps(metrics))


def _gate(reports: Path, cfg: GateParams = GateParams()) -> dict:
    return gate(cfg, reports / "metrics.json", reports / "quality" / "quality.json",
                reports / "drift" / "summary.json", reports / "gate.json", Path("reports/index.html"),
                champion_path=reports / "champion.json")


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A published folder whose live model is v1."""
    published = tmp_path / "published"
    _publish_fake(_reports(tmp_path / "v1run", None, published_share=None), published, "v1", LIVE)
    return published


def test_without_a_live_model_the_gate_checks_drift_only(tmp_path: Path):
    reports = _reports(tmp_path, None, published_share=None)
    assert _gate(reports) == {"passed": True, "forced": False, "reasons": 0, "warnings": 0,
                              "quality": "not compared: no previous published model"}
    decision = json.loads((reports / "gate.json").read_text())
    assert decision["passed"] and decision["reasons"] == [] and decision["live_version"] is None
    quality, window, pub, catalog, baselines = decision["checks"]
    assert catalog["name"] == "catalog" and catalog["passed"] and "skipped" in catalog
    assert baselines == {"name": "baselines", "metric": "ndcg@20", "current": NDCG, "max_baseline_lead": None,
                         "passed": True, "baselines": {}}      # metrics.json without baselines: none to compare
    assert quality["skipped"] == "not compared: no previous published model" and quality["passed"]
    assert pub["skipped"] == "no previous published model"
    assert window["name"] == "drift.window" and window["passed"] and window["drift_share"] == 0.0
    assert decision["missing_inputs"] == []
    assert decision["forced"] is False and decision["forced_by"] is None and decision["at"].endswith("+00:00")


def test_a_quality_drop_against_the_live_model_blocks_in_one_line(tmp_path: Path):
    reports = _reports(tmp_path)
    with pytest.raises(GateBlocked) as err:
        _gate(reports)
    message = str(err.value)
    assert message == ("gate: ndcg@20 0.2500 vs live v1 0.2810 on this run's holdout: fell 0.031 > 0.010; "
                       "see reports/index.html; to publish anyway: towerflow run --force --reason TEXT")
    decision = json.loads((reports / "gate.json").read_text())   # written, and the reports stay
    assert not decision["passed"] and decision["message"] == message and decision["live_version"] == "v1"
    quality = decision["checks"][0]
    assert (quality["live"], quality["current"], quality["drop"], quality["passed"]) == (LIVE, NDCG, 0.031, False)
    assert (quality["cold_users"], quality["cold_items"]) == (3, 1)
    with pytest.raises(GateBlocked, match="ndcg@20 0.2500 vs live v1"):
        require_passed(reports / "gate.json")       # what publish calls: it refuses to go on


def test_a_drop_within_the_margin_passes(tmp_path: Path):
    reports = _reports(tmp_path, ndcg=0.275)   # 0.006 below the live 0.281
    assert _gate(reports)["passed"]
    assert json.loads((reports / "gate.json").read_text())["checks"][0]["drop"] == 0.006
    assert require_passed(reports / "gate.json")["passed"]
    # a looser or disabled quality check: the same planted drop passes
    reports = _reports(tmp_path)
    assert _gate(reports, GateParams(max_quality_drop=0.05))["passed"]
    assert _gate(reports, GateParams(max_quality_drop=None))["passed"]
    assert json.loads((reports / "gate.json").read_text())["checks"][0]["skipped"] == "gate.max_quality_drop is null"


def test_a_live_model_of_another_source_is_not_compared(tmp_path: Path):
    change = "new source: this run reads /data/b, live v1 was trained on /data/a"
    reports = _reports(tmp_path, published_share=None, change=change)      # 0.031 below live: not judged
    assert _gate(reports)["quality"] == f"{change}: judged by its own checks (gate.compare_across_sources is false)"
    quality = json.loads((reports / "gate.json").read_text())["checks"][0]
    assert quality["skipped"] == f"{change}: judged by its own checks (gate.compare_across_sources is false)"
    assert "live" not in quality and "drop" not in quality
    with pytest.raises(GateBlocked, match="fell 0.031"):                   # the strict comparison, on request
        _gate(reports, GateParams(compare_across_sources=True))


def test_a_live_model_that_cannot_be_scored_is_not_compared(tmp_path: Path):
    reports = _reports(tmp_path)
    why = "another id space: the live model's item ids are int64, this run's are string"
    champion = {"compared": False, "live_version": "v1", "reason": why, "lineage": {"change": None}}
    (reports / "champion.json").write_text(json.dumps(champion))
    assert _gate(reports)["passed"]
    decision = json.loads((reports / "gate.json").read_text())
    assert decision["checks"][0]["skipped"] == f"not compared: {why}" and decision["live_version"] == "v1"


def test_drift_over_a_threshold_blocks(tmp_path: Path):
    reports = _reports(tmp_path, ndcg=0.281, window=0.6, published_share=0.2)
    with pytest.raises(GateBlocked) as err:
        _gate(reports)
    assert str(err.value).startswith(
        "gate: newest-window drift in 2 of 10 columns beyond their natural range (rating 0.40 > 0.20, "
        "hour_of_day 0.30 > 0.20); drift vs the live model's data in 1 of 10 columns beyond their natural "
        "range (item_year 0.40 > 0.20); see ")
    # each comparison has its own threshold (a share of the columns); null turns one off
    limits = DriftLimits(window=None, published=0.05)
    with pytest.raises(GateBlocked, match=r"gate: drift vs the live model's data in 1 of 10 columns beyond their "
                                          r"natural range \(item_year 0.40 > 0.20\), share 0.10 > 0.05; see "):
        _gate(reports, GateParams(max_drift_share=limits))
    assert _gate(reports, GateParams(max_drift_share=DriftLimits(window=0.7, published=0.5)))["passed"]


def test_forced_run_passes_and_records_who_and_why(tmp_path: Path):
    reports = _reports(tmp_path, window=0.6)
    cfg = GateParams(force=True, force_reason="hotfix for a broken catalog, reviewed by ops")
    assert _gate(reports, cfg) == {"passed": True, "forced": True, "reasons": 2, "warnings": 0, "quality":
                                   "ndcg@20 0.2500 vs live v1 0.2810 on this run's holdout: fell 0.031 > 0.010"}
    decision = json.loads((reports / "gate.json").read_text())
    assert decision["passed"] and decision["forced"]
    assert decision["forced_by"] == getpass.getuser()
    assert decision["force_reason"] == "hotfix for a broken catalog, reviewed by ops"
    assert len(decision["reasons"]) == 2 and "forced by" in decision["message"]
    # the name the CLI records wins over the login name of the process DVC starts
    _gate(reports, cfg.model_copy(update={"forced_by": "alice"}))
    assert json.loads((reports / "gate.json").read_text())["forced_by"] == "alice"


def test_force_needs_a_reason_and_a_known_metric(tmp_path: Path):
    with pytest.raises(ValueError, match="gate.force needs gate.force_reason"):
        GateParams(force=True)
    with pytest.raises(ConfigError, match="gate.force needs gate.force_reason"):
        load_params(ROOT / "params.yaml", ["gate.force=true"])
    reports = _reports(tmp_path, None)
    with pytest.raises(ConfigError, match=r"gate.metric 'ndcg@50' is not a two_tower figure of .*metrics.json "
                                          r"\(it has: ndcg@20, recall@20\)"):
        _gate(reports, GateParams(metric="ndcg@50"))
    (reports / "drift" / "summary.json").unlink()
    with pytest.raises(MissingStageInput, match="summary.json: not found; run the report stage first"):
        _gate(reports)
    (reports / "champion.json").unlink()
    with pytest.raises(MissingStageInput, match="champion.json: not found; run the evaluate stage first"):
        _gate(reports)


def test_live_bundle_reads_the_live_pointer(tmp_path: Path, published: Path):
    assert live_bundle(published).version == "v1"
    assert live_bundle(tmp_path / "nothing") is None
    (published / "LIVE").write_text(json.dumps({"version": "gone"}))
    assert live_bundle(published) is None                # a pointer to a missing bundle: nothing to compare
    # a run whose reports are missing still builds its bundle: the next gate says what it lacks
    assert bundle_reports(tmp_path / "nothing", tmp_path / "bundle") == []
    with pytest.raises(MissingStageInput, match="gate.json: not found; run the gate stage first"):
        require_passed(tmp_path / "nothing" / "gate.json")


def test_cli_force_needs_a_reason_in_one_line():
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--params", str(ROOT / "params.yaml"), "--force"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "towerflow: error: --force needs --reason TEXT: say why this run may publish past the gate"]
    result = runner.invoke(app, ["run", "--params", str(ROOT / "params.yaml"), "--reason", "why"])
    assert result.exit_code == 1 and "--reason goes with --force" in result.output


def test_cli_force_becomes_gate_params_that_dvc_lock_records(tmp_path: Path):
    overrides = _force_overrides(True, "data fix: see #42")
    params = load_params(ROOT / "params.yaml", overrides)
    assert params.gate.force and params.gate.force_reason == "data fix: see #42"
    assert params.gate.forced_by == getpass.getuser()
    assert _force_overrides(False, None) == []
    with pytest.raises(TowerflowError):
        _force_overrides(True, "  ")


def test_stage_gate_blocked_through_the_cli_is_one_line(tmp_path: Path):
    """`towerflow stage gate` (what dvc.yaml runs): one line, gate.json written, and exit 3
    (flows/errors.py BLOCKED_EXIT), not 1: a scheduler or CI job tells a model kept from going live
    from a broken run."""
    project = tmp_path / "project"
    _reports(project)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = CliRunner().invoke(app, ["stage", "gate", "--params", str(project / "params.yaml")])
    assert result.exit_code == BLOCKED_EXIT == 3
    assert result.output.strip().splitlines() == [
        "towerflow: error: gate: ndcg@20 0.2500 vs live v1 0.2810 on this run's holdout: fell 0.031 > 0.010; "
        "see reports/index.html; to publish anyway: towerflow run --force --reason TEXT"]
    assert not json.loads((project / "reports" / "gate.json").read_text())["passed"]
    (project / "reports" / "champion.json").unlink()                     # any other failure: 1
    assert CliRunner().invoke(app, ["stage", "gate", "--params", str(project / "params.yaml")]).exit_code == 1


def test_a_window_too_short_to_judge_passes_and_missing_inputs_are_recorded(tmp_path: Path):
    """The report stage could not judge the window (too few rows) nor compute Novelty: the gate still
    decides on metrics.json, passes the window with its row count and records what it lacked."""
    reports = _reports(tmp_path, live=None)
    (reports / "drift" / "summary.json").write_text(json.dumps(
        {"window": {"skipped": "not judged: 40 rows: the newest window, 2 earlier and a past need 2000", "rows": 40}}))
    quality = json.loads((reports / "quality" / "quality.json").read_text())
    quality["not_computed"] = {"novelty@20": "ValueError: Too many bins for data range."}
    (reports / "quality" / "quality.json").write_text(json.dumps(quality))
    assert _gate(reports)["passed"]
    decision = json.loads((reports / "gate.json").read_text())
    window = decision["checks"][1]
    assert window["passed"] and window["rows"] == 40 and window["skipped"].startswith("not judged: 40 rows")
    assert decision["missing_inputs"] == [
        "quality.json: novelty@20 not computed (ValueError: Too many bins for data range.)",
        "drift/summary.json: no 'published' comparison"]


def test_a_feature_column_shuffled_across_the_catalog_is_blocked_naming_it(tmp_path: Path):
    """Drift cannot see a column shuffled across item rows (its distribution is unchanged); the items
    both catalogs hold can: their genres no longer agree with the live catalog beyond chance."""
    reports = _reports(tmp_path, live=NDCG)
    summary = json.loads((reports / "drift" / "summary.json").read_text())
    summary["catalog"] = {"common_items": 2000, "live_version": "v1", "columns": {
        "year": {"kind": "numeric", "agreement": 0.998, "changed_share": 0.02},
        "genres": {"kind": "multi", "agreement": 0.004, "changed_share": 0.96}}}
    (reports / "drift" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(GateBlocked) as err:
        _gate(reports)
    assert ("item features disagree with the live catalog on 2,000 common items: genres 0.00 (96% changed) "
            "< 0.50") in str(err.value)
    summary["catalog"]["columns"]["genres"] = {"kind": "multi", "agreement": 0.93, "changed_share": 0.05}
    (reports / "drift" / "summary.json").write_text(json.dumps(summary))
    assert _gate(reports)["passed"]      # 5% of items re-tagged: a catalog that lives


def _with_baselines(reports: Path, popular: float, ease: float | None, error: float = 0.004) -> None:
    """metrics.json with the baselines and standard errors as the evaluate stage writes them."""
    metrics = json.loads((reports / "metrics.json").read_text())
    metrics["most_popular"] = {"ndcg@20": popular, "recall@20": 0.1}
    metrics["ease"] = {"ndcg@20": ease, "recall@20": 0.1} if ease is not None else {"skipped": "too many items"}
    metrics["standard_errors"] = {m: {"ndcg@20": error, "recall@20": error} for m in ("two_tower", "most_popular", "ease")}
    (reports / "metrics.json").write_text(json.dumps(metrics))


def test_a_baseline_ahead_beyond_noise_is_a_warning_by_default_and_blocks_when_asked(tmp_path: Path, capsys):
    reports = _reports(tmp_path, None, published_share=None)
    _with_baselines(reports, popular=0.30, ease=0.26)          # the two-tower: 0.25; noise 2·√2·0.004 = 0.0113
    assert _gate(reports)["warnings"] == 1
    decision = json.loads((reports / "gate.json").read_text())
    check = decision["checks"][-1]
    assert check["name"] == "baselines" and check["passed"] and decision["passed"]
    assert check["baselines"]["most_popular"] == {"value": 0.30, "lead": 0.05, "noise": 0.011314}
    assert check["baselines"]["ease"]["lead"] == 0.01              # within the noise: not named
    assert decision["warnings"] == [check["warning"]]
    assert check["warning"].startswith("most_popular ndcg@20 0.3000 is above the two-tower's 0.2500 on this run's "
                                       "holdout by 0.0500 (noise ±0.0113): the data may hold little")
    assert "gate: warning: most_popular ndcg@20" in capsys.readouterr().err
    with pytest.raises(GateBlocked, match=r"most_popular ndcg@20 0.3000 is above .* > gate.max_baseline_lead 0.020"):
        _gate(reports, GateParams(max_baseline_lead=0.02))
    assert _gate(reports, GateParams(max_baseline_lead=0.06))["warnings"] == 1   # a lead below the limit warns


def test_a_baseline_within_noise_or_behind_is_no_warning(tmp_path: Path):
    reports = _reports(tmp_path, None, published_share=None)
    _with_baselines(reports, popular=0.26, ease=None, error=0.01)      # lead 0.01 < noise 0.028; EASE skipped
    assert _gate(reports, GateParams(max_baseline_lead=0.0))["warnings"] == 0
    check = json.loads((reports / "gate.json").read_text())["checks"][-1]
    assert check["passed"] and "warning" not in check and list(check["baselines"]) == ["most_popular"]
    _with_baselines(reports, popular=0.26, ease=0.2, error=0.001)      # now beyond noise: 0.01 > 0.0028
    with pytest.raises(GateBlocked, match="most_popular ndcg@20 0.2600 is above"):
        _gate(reports, GateParams(max_baseline_lead=0.0))


def test_a_drop_within_the_holdouts_noise_warns_instead_of_blocking(tmp_path: Path, capsys):
    """A drop above gate.max_quality_drop that twice the paired difference's standard error covers
    (champion.json difference_errors: a small holdout) is not blocked: a warning says why; the same
    drop on a holdout whose error is small blocks, naming the noise."""
    reports = _reports(tmp_path)                                     # fell 0.031
    champion = json.loads((reports / "champion.json").read_text())
    (reports / "champion.json").write_text(json.dumps({**champion, "difference_errors": {"ndcg@20": 0.02}}))
    assert _gate(reports)["passed"]
    decision = json.loads((reports / "gate.json").read_text())
    quality = decision["checks"][0]
    assert quality["passed"] and quality["noise"] == 0.04 and quality["drop"] == 0.031
    assert quality["warning"] == ("ndcg@20 0.2500 vs live v1 0.2810 on this run's holdout: fell 0.031 > 0.010, but "
                                  "within this holdout's noise ±0.040 over 100 users: not blocked; a larger holdout "
                                  "(evaluate.max_users, split.test_fraction) can tell")
    assert decision["warnings"] == [quality["warning"]] and "gate: warning: ndcg@20" in capsys.readouterr().err
    (reports / "champion.json").write_text(json.dumps({**champion, "difference_errors": {"ndcg@20": 0.005}}))
    with pytest.raises(GateBlocked, match=r"fell 0.031 > 0.010 \(noise ±0.010\); see"):
        _gate(reports)
