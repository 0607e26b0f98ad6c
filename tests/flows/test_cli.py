"""The CLI: expected failures print one line naming the problem and exit 1."""
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_the_commands():
    result = _invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "stage", "recommend", "params"):
        assert command in result.output


def test_unknown_stage_is_named():
    result = _invoke("stage", "trian", "--params", str(ROOT / "params.yaml"))
    assert result.exit_code == 1
    assert "unknown stage 'trian'" in result.output


def test_bad_override_fails_before_running():
    result = _invoke("run", "--params", str(ROOT / "params.yaml"), "--set", "train.epochz=3")
    assert result.exit_code == 1
    assert "unknown key 'train.epochz'" in result.output


def test_recommend_needs_exactly_one_user_source():
    result = _invoke("recommend", "--params", str(ROOT / "params.yaml"))
    assert result.exit_code == 1
    assert "exactly one of --user-id or --users-file" in result.output


def test_recommend_before_any_run_says_what_to_do(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    result = _invoke("recommend", "--user-id", "1", "--params", str(params))
    assert result.exit_code == 1
    assert "LIVE not found: nothing is published yet" in result.output and "towerflow run" in result.output


def test_the_run_summary_counts_added_quarantined_and_dropped_events(tmp_path, capsys):
    import json

    from flows.cli.pipeline import _print_events

    (tmp_path / "schema.json").write_text(json.dumps({"events": {"read": 4, "added": 3, "quarantined": 1}}))
    _print_events(tmp_path)
    out = capsys.readouterr().out
    assert "3 real-time events added to the interactions, 1 quarantined" in out
    assert str(tmp_path / "events_quarantine.jsonl") in out
    assert "dropped" not in out
    # what ingest leaves out by rule is said too (a pushed event of a user the source lacks)
    (tmp_path / "schema.json").write_text(json.dumps({"events": {"read": 3, "added": 1, "duplicates": 1,
                                                                 "unknown": 1, "quarantined": 0}}))
    _print_events(tmp_path)
    assert ("1 real-time events added to the interactions, 0 quarantined; dropped: 1 exact duplicates (a "
            "retried push, or already in the source), 1 of a user or item the source does not have"
            ) in capsys.readouterr().out
    (tmp_path / "schema.json").write_text(json.dumps({"user_id_dtype": "int64"}))     # no events read
    _print_events(tmp_path)
    assert capsys.readouterr().out == ""


def test_a_stage_started_by_a_run_reads_the_runs_params_file(tmp_path, monkeypatch):
    # what flows/reproduce.py sets for the stage commands of a run: its params file, not params.yaml
    from flows.run_params import ENV, write_run_params

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    missing = tmp_path / "not-there"
    monkeypatch.setenv(ENV, str(write_run_params(tmp_path, [f"data.source={missing}"])))
    result = _invoke("stage", "ingest", "--params", str(tmp_path / "params.yaml"))
    assert result.exit_code == 1
    assert str(missing) in result.output
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_the_runs_params_file_reads_back_as_params_yaml_plus_the_overrides(tmp_path):
    """The run's file is params.yaml's text edited in place: quoted scalars stay quoted (a round trip
    that drops them turns `"::1"` in a flow list into YAML no parser reads) and nulls stay `null`."""
    import yaml

    from flows.params import apply_overrides
    from flows.run_params import write_run_params

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    overrides = ["data.source=/elsewhere", "train.epochs=3", "gate.force=true", "gate.force_reason=a reason"]
    written = write_run_params(tmp_path, overrides).read_text()
    assert yaml.safe_load(written) == apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    assert '"::1"' in written and "max_users: null" in written


def test_the_run_summary_shows_the_gates_warnings_and_why_a_baseline_is_missing(tmp_path: Path, capsys):
    """The end of `towerflow run`: each model's figures (a skipped EASE with its reason, not an empty
    line) and the gate's warnings of this run, which the gate stage printed among many lines."""
    import json
    from types import SimpleNamespace

    from flows.cli.pipeline import _print_summary
    from flows.params import load_params

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    reports = tmp_path / params.paths.reports
    reports.mkdir(parents=True)
    (reports / "metrics.json").write_text(json.dumps({
        "two_tower": {"ndcg@20": 0.0862}, "most_popular": {"ndcg@20": 0.1535},
        "ease": {"skipped": "catalog has 20000 items > evaluate.ease_max_items=10000"}}))
    warning = "most_popular ndcg@20 0.1535 is above the two-tower's 0.0862 on this run's holdout by 0.0673"
    (reports / "gate.json").write_text(json.dumps({"passed": True, "warnings": [warning]}))
    runs = [SimpleNamespace(stage="gate", ran=True, seconds=2.2)]
    _print_summary(runs, params, tmp_path, 2.2)
    out = capsys.readouterr().out
    assert "          two_tower    ndcg@20=0.0862\n" in out
    assert "          ease         skipped: catalog has 20000 items > evaluate.ease_max_items=10000\n" in out
    assert f"warning:  {warning} (gate.json)\n" in out
    # a run in which the gate did not run (up to date) does not repeat an old run's warnings
    _print_summary([SimpleNamespace(stage="gate", ran=False, seconds=0.0)], params, tmp_path, 0.0)
    assert "warning:" not in capsys.readouterr().out
