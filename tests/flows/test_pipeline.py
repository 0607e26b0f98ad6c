"""End to end: the Prefect flow over the DVC stages in a temporary git repo, then DVC agrees.

After `towerflow run`, `dvc status` is clean and `dvc repro` does nothing; after a parameter change
only the stages that depend on it run again; the CLI serves recommendations from the published alias;
a broken source stops before anything is written.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from tests.project import DVC, make_project, run
from flows.pipeline import run_pipeline
from flows.stages.registry import STAGES

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first

TOWERFLOW = str(Path(sys.executable).parent / "towerflow")


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, contract_source, prefect_harness):
    root = make_project(tmp_path_factory.mktemp("flowproj"), contract_source)
    remote = tmp_path_factory.mktemp("dvc_remote")
    run([DVC, "remote", "add", "-d", "store", str(remote)], root)
    first = run_pipeline(root)
    # the run as a user versions it: params + dvc.lock in git, outputs in the DVC cache and remote
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
    _snapshot(root, "first")
    second = run_pipeline(root)
    # a parameter change reruns only the stages that depend on it
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_pipeline(root)
    return root, first, second, third


REPRODUCED = ("artifacts/model/full/model.pt", "artifacts/model/eval/model.pt", "reports/metrics.json")


def _snapshot(root: Path, name: str) -> None:
    """Copies of the files a reproduction must give back byte for byte."""
    keep = root.parent / f"{root.name}-{name}"
    for rel in REPRODUCED:
        (keep / rel).parent.mkdir(parents=True, exist_ok=True)
        (keep / rel).write_bytes((root / rel).read_bytes())


def _declared_outputs(root: Path) -> list[Path]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    paths = params["paths"]
    dvc = (root / "dvc.yaml").read_text()
    for key, value in paths.items():
        dvc = dvc.replace("${paths.%s}" % key, value)
    stages = yaml.safe_load(dvc)["stages"]
    outs = []
    for stage in stages.values():
        for section in ("outs", "metrics", "plots"):
            for entry in stage.get(section, []):
                outs.append(root / (next(iter(entry)) if isinstance(entry, dict) else entry))
    return outs


def test_flow_runs_every_stage_and_writes_every_declared_output(flow_project):
    root, first, _, _ = flow_project
    assert [r.stage for r in first] == list(STAGES)
    assert all(r.ran and r.ok for r in first)
    missing = [str(p) for p in _declared_outputs(root) if not p.exists()]
    assert not missing, missing
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert 0 < metrics["two_tower"]["recall@20"] <= 1
    live = json.loads((root / "artifacts/published/LIVE").read_text())["version"]
    bundle = json.loads((root / "artifacts/published/versions" / live / "bundle.json").read_text())
    assert bundle["verification"]["recall_at_100"] >= 0.95
    # the run's reports travel with the bundle: the next run's gate compares against them
    assert (root / "artifacts/published/versions" / live / "metrics.json").is_file()
    # and so does the rank stage's ranker (`rerank=true` serves the live version's own), under digests
    assert (root / "artifacts/published/versions" / live / "ranker/ranker.json").is_file()
    assert "ranker/ranker.json" in bundle["files"] and "model/model.pt" in bundle["files"]
    assert (root / "reports/drift/window.html").stat().st_size > 1000
    assert json.loads((root / "reports/gate.json").read_text())["passed"] is True
    portal = (root / "reports/index.html").read_text()
    assert "validation/index.html" in portal and "quality/quality.html" in portal
    assert (root / "reports/validation/index.html").exists()


def test_second_run_and_dvc_repro_do_nothing(flow_project):
    root, _, second, _ = flow_project
    assert [r.ran for r in second] == [False] * len(STAGES)


def test_param_change_reruns_only_dependent_stages(flow_project):
    root, _, _, third = flow_project
    ran = {r.stage for r in third if r.ran}
    assert ran == {"train", "rank", "evaluate", "report", "gate", "publish"}


def test_the_next_run_scores_the_live_evaluation_model_on_its_holdout(flow_project, contract_source):
    """Each bundle keeps its run's evaluation model and lineage; the third run (3 epochs) scored the
    first run's (2 epochs) on its own holdout, and the gate compared the two."""
    root, *_ = flow_project
    live = json.loads((root / "artifacts/published/LIVE").read_text())["version"]
    bundle = root / "artifacts/published/versions" / live
    assert (bundle / "eval_model" / "model.pt").is_file()
    assert json.loads((bundle / "bundle.json").read_text())["lineage"]["source"] == str(contract_source)
    champion = json.loads((root / "reports/champion.json").read_text())
    assert champion["compared"] and champion["scored"] == "eval_model" and champion["live_version"] != live
    assert champion["lineage"]["change"] is None and champion["cold_users"] == champion["cold_items"] == 0
    metrics = json.loads((root / "reports/metrics.json").read_text())["two_tower"]
    assert champion["challenger"] == metrics and champion["metrics"] != metrics
    quality = json.loads((root / "reports/gate.json").read_text())["checks"][0]
    assert quality["live"] == champion["metrics"]["ndcg@20"] and quality["current"] == metrics["ndcg@20"]


def test_dvc_agrees_after_the_flow(flow_project):
    root, *_ = flow_project
    status = run([DVC, "status", "--json"], root)
    assert json.loads(status.stdout or "{}") == {}
    repro = run([DVC, "repro"], root)
    assert "Running stage" not in repro.stdout + repro.stderr


def test_recommend_from_the_published_alias(flow_project, monkeypatch):
    from flows.cli import app

    root, *_ = flow_project
    inter = pd.read_parquet(root / "data/ingested/interactions.parquet")
    user = int(inter["user_id"].iloc[0])
    # in this process, as a user in the project folder would type it (the default params.yaml, paths
    # relative to it): a `towerflow` subprocess would add two cold starts of ~10 s (import feast)
    # and nothing more; the entry point itself is run by the tests below
    monkeypatch.chdir(root)
    one = CliRunner().invoke(app, ["recommend", "--user-id", str(user), "--k", "7"])
    assert one.exit_code == 0, one.output
    rows = [line.split(",") for line in one.stdout.strip().splitlines()]
    assert rows[0] == ["user_id", "item_id", "rank", "score", "cold_start"]
    assert len(rows) == 8 and [int(r[2]) for r in rows[1:]] == list(range(1, 8))
    seen = set(inter.loc[inter["user_id"] == user, "item_id"])
    assert not seen & {int(r[1]) for r in rows[1:]}

    users = sorted(inter["user_id"].unique())[:5]
    (root / "users.txt").write_text("user_id\n" + "\n".join(map(str, users)) + "\n\n999999\n")
    many = CliRunner().invoke(app, ["recommend", "--users-file", "users.txt", "--k", "5", "--out", "recs.csv"])
    assert many.exit_code == 0, many.output
    recs = pd.read_csv(root / "recs.csv")
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score", "cold_start"]
    assert set(recs["user_id"]) == set(users) | {999999}  # the unknown user gets a cold-start answer
    assert (recs.groupby("user_id").size() == 5).all()


def test_broken_source_stops_before_anything_is_written(flow_project, tmp_path):
    root, *_ = flow_project
    manifest_before = (root / "artifacts/published/LIVE").read_bytes()
    ingested_before = (root / "data/ingested/interactions.parquet").read_bytes()
    proc = run([TOWERFLOW, "run", "--set", f"data.source={tmp_path / 'nope'}"], root, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in proc.stderr
    assert (root / "artifacts/published/LIVE").read_bytes() == manifest_before
    assert (root / "data/ingested/interactions.parquet").read_bytes() == ingested_before


def test_debug_flag_shows_the_traceback(flow_project, tmp_path):
    root, *_ = flow_project
    quiet = run([TOWERFLOW, "stage", "ingest", "--set", f"data.source={tmp_path / 'missing'}"], root, check=False)
    loud = run([TOWERFLOW, "--debug", "stage", "ingest", "--set", f"data.source={tmp_path / 'missing'}"], root,
               check=False)
    assert quiet.returncode == loud.returncode == 1
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert "missing" in quiet.stderr.strip().splitlines()[-1]


def test_the_run_is_pushed_to_the_remote(flow_project):
    root, *_ = flow_project
    status = run([DVC, "status", "--cloud", "--json"], root)
    assert json.loads(status.stdout or "{}") == {}       # nothing only local: every output is on the remote


def test_going_back_restores_the_run_byte_for_byte_and_retraining_reproduces_it(flow_project, tmp_path):
    root, *_ = flow_project
    work = tmp_path / "copy"                              # the other tests keep the original as it is
    shutil.copytree(root, work, symlinks=True)
    first = root.parent / f"{root.name}-first"
    assert (work / REPRODUCED[0]).read_bytes() != (first / REPRODUCED[0]).read_bytes()  # epochs changed
    run(["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"], work)
    run([DVC, "checkout", "--force"], work)
    for rel in REPRODUCED:
        assert (work / rel).read_bytes() == (first / rel).read_bytes(), rel
    # same params, same seed: training again gives the same model and the same metrics
    run([DVC, "repro", "--force", "--single-item", "train"], work)
    run([DVC, "repro", "--force", "--single-item", "evaluate"], work)
    assert json.loads((work / "reports/metrics.json").read_text()) == \
        json.loads((first / "reports/metrics.json").read_text())
