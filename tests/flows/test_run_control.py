"""How the flow runs stages: transient failures are retried with backoff, final ones are not, and a
second run of the same project is refused while one holds the run lock. A real DVC repo in a temp
dir whose stages are small shell commands; the real Prefect flow under the test harness."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tests.project import run
from flows.errors import RunInProgress, StageFailed
from flows.pipeline import run_pipeline
from flows.run_lock import run_lock

DVC = str(Path(sys.executable).parent / "dvc")


def _repo(root: Path, cmd: str, retries: int = 2, **run_cfg: object) -> Path:
    """A git + DVC repo with one stage named `ingest` running `cmd`."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"run": {"retries": retries, "retry_delay_s": 0, **run_cfg}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {"cmd": cmd, "outs": ["out.txt"]}}}))
    for cmd_ in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                 ["git", "config", "user.name", "t"], [DVC, "init", "-q"], [DVC, "config", "core.analytics", "false"]):
        run(cmd_, root)
    return root


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# fails with 75 (transient) until it has been tried `n` times, then writes its output
FLAKY = ("n=$(cat tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > tries; "
         "if [ $n -lt {n} ]; then exit 75; fi; echo ok > out.txt")


def test_a_transient_failure_is_retried(harness, tmp_path):
    root = _repo(tmp_path / "p", FLAKY.format(n=3), retries=2)
    runs = run_pipeline(root, ("ingest",))
    assert runs[0].ok and runs[0].ran
    assert (root / "tries").read_text().strip() == "3"        # two retries, then success
    assert (root / "out.txt").exists()


def test_retries_run_out(harness, tmp_path):
    root = _repo(tmp_path / "p", FLAKY.format(n=10), retries=1)
    with pytest.raises(StageFailed, match="may pass on a retry"):
        run_pipeline(root, ("ingest",))
    assert (root / "tries").read_text().strip() == "2"


def test_a_final_failure_is_not_retried(harness, tmp_path):
    root = _repo(tmp_path / "p", "n=$(cat tries 2>/dev/null || echo 0); echo $((n+1)) > tries; exit 1")
    with pytest.raises(StageFailed, match="stage 'ingest' failed"):
        run_pipeline(root, ("ingest",))
    assert (root / "tries").read_text().strip() == "1"


def test_a_second_run_is_refused_while_one_holds_the_lock(harness, tmp_path):
    root = _repo(tmp_path / "p", "echo ok > out.txt")
    with run_lock(root):
        with pytest.raises(RunInProgress, match=r"another towerflow run .* is in progress \(pid \d+"):
            run_pipeline(root, ("ingest",))
    assert not (root / "out.txt").exists()
    assert run_pipeline(root, ("ingest",))[0].ok        # released: the next run goes ahead


def test_stages_run_on_a_dask_cluster_by_a_setting(harness, tmp_path):
    pytest.importorskip("prefect_dask")
    # run.task_runner: dask with no address starts a local Dask cluster; the stage task is submitted
    # to it and the run completes the same way
    root = _repo(tmp_path / "p", "echo ok > out.txt", task_runner="dask")
    runs = run_pipeline(root, ("ingest",))
    assert runs[0].ok and runs[0].ran
    assert (root / "out.txt").read_text().strip() == "ok"


def test_a_task_runner_whose_package_is_missing_is_one_line(monkeypatch):
    from flows.errors import ConfigError
    from flows.params import RunParams
    from flows.pipeline import task_runner

    monkeypatch.setitem(sys.modules, "prefect_ray", None)     # not installed, whether it is here or not
    with pytest.raises(ConfigError, match="run.task_runner is ray but prefect_ray is not installed: pip install prefect-ray"):
        task_runner(RunParams(task_runner="ray"))
