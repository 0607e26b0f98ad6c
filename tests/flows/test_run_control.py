"""How the flow runs stages: transient failures are retried with backoff, final ones are not, a
second run of the same project is refused while one holds the run lock, a hung stage is stopped with
its processes, a failed or stopped stage gets its last good outputs back, a stopped run ends through
its exit handlers (Prefect's stops its temporary server), and a run's overrides reach
its stages and dvc.lock but never params.yaml. A real DVC repo in a temp
dir whose stages are small shell commands; the real Prefect flow under the test harness."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.project import DVC, ROOT, git_dvc_repo, run
from flows.cli import _force_overrides
from flows.errors import GateBlocked, RunInProgress, StageFailed
from flows.pipeline import run_pipeline
from flows.run_lock import run_lock
from flows.run_params import RUN_PARAMS

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first


def _repo(root: Path, cmd: str, retries: int = 2, **run_cfg: object) -> Path:
    """A git + DVC repo with one stage named `ingest` running `cmd`."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"run": {"retries": retries, "retry_delay_s": 0, **run_cfg}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {"cmd": cmd, "outs": ["out.txt"]}}}))
    git_dvc_repo(root)
    return root


@pytest.fixture(scope="module")
def harness(prefect_harness):
    """The session's Prefect test harness (tests/conftest.py)."""


# fails with 75 (transient) until it has been tried `n` times, then writes its output
FLAKY = ("n=$(cat tries 2>/dev/null || echo 0); n=$((n+1)); echo $n > tries; "
         "if [ $n -lt {n} ]; then exit 75; fi; echo ok > out.txt")


def test_a_runs_stage_processes_are_forks_of_its_fork_server_which_ends_with_the_run(harness, tmp_path,
                                                                                      monkeypatch):
    """The run starts one fork server (DVC imported) and forks each reproduce process from it
    (flows/fork_server.py), instead of a new interpreter for each; the server ends with the run."""
    import psutil

    from flows import fork_server

    started: list[int] = []
    real = fork_server.ForkServer.start

    def spy(self, module, args, cwd):  # noqa: ANN001, ANN202
        forked = real(self, module, args, cwd)
        started.append(forked.pid)
        return forked

    monkeypatch.setattr(fork_server.ForkServer, "start", spy)
    root = _repo(tmp_path / "p", "echo ok > out.txt")
    runs = run_pipeline(root, ("ingest",))
    assert runs[0].ran and (root / "out.txt").read_text() == "ok\n"
    assert len(started) == 2        # the stage, and the run's finish (the DVC cache's collection)
    assert not [p for p in psutil.Process().children(recursive=True) if "flows.fork_server" in p.cmdline()]

    def gone(self, module, args, cwd):  # noqa: ANN001, ANN202
        raise fork_server.ForkServerGone("the server ended")

    monkeypatch.setattr(fork_server.ForkServer, "start", gone)     # then a new interpreter, as before
    again = run_pipeline(root, ("ingest",), force=True)
    assert again[0].ok and again[0].ran and (root / "out.txt").read_text() == "ok\n"


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


def test_a_final_failure_is_not_retried(harness, tmp_path, caplog):
    root = _repo(tmp_path / "p", "n=$(cat tries 2>/dev/null || echo 0); echo $((n+1)) > tries; exit 1")
    with pytest.raises(StageFailed, match="stage 'ingest' failed"):
        run_pipeline(root, ("ingest",))
    assert (root / "tries").read_text().strip() == "1"
    # the run's log says so too (it said "ingest: up to date", as for a stage with nothing to do)
    assert "ingest: failed in" in caplog.text and "up to date" not in caplog.text


def test_a_failed_stage_says_why_in_the_runs_failure(harness, tmp_path):
    """The stage command's own one-line error is the run's failure (the terminal's last line and
    Prefect's state message), not only DVC's "failed to run: ..., exited with 1"."""
    root = _repo(tmp_path / "p", "towerflow stage nosuch", retries=0)
    with pytest.raises(StageFailed, match="stage 'ingest' failed: unknown stage 'nosuch'; stages are: ingest"):
        run_pipeline(root, ("ingest",))
    assert not list((root / RUN_PARAMS.parent).glob("*.error"))      # read, then removed


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


# --- a stage that runs past run.stage_timeout_s, and overrides that never touch params.yaml ---

def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_hung_stage_is_stopped_with_its_processes_at_the_timeout(harness, tmp_path, capfd):
    # the stage's shell starts a background child and then blocks: both must be gone after the timeout.
    # The clock runs from `dvc repro`'s start, and on a loaded 2-core CI machine DVC took over 2 s to
    # reach the command (no sh.pid: nothing of what this checks had started), so a longer timeout
    # is tried then
    for timeout in (2, 8, 30):
        root = _repo(tmp_path / f"p{timeout}", "sleep 300 & echo $! > bg.pid; echo $$ > sh.pid; sleep 300",
                     retries=0, stage_timeout_s=timeout)
        t0 = time.monotonic()
        with pytest.raises(StageFailed) as failed:
            run_pipeline(root, ("ingest",))
        assert time.monotonic() - t0 < 60 + timeout
        assert str(failed.value) == (f"stage 'ingest' ran past run.stage_timeout_s ({timeout} s): stopped it "
                                     "and the processes it started")
        if (root / "sh.pid").exists():      # written after bg.pid: the shell and its child had started
            break
    else:
        pytest.fail("the stage's command never started, even with 30 s")
    pids = [int((root / name).read_text()) for name in ("sh.pid", "bg.pid")]
    assert not [pid for pid in pids if _alive(pid)], "a stage process outlived the timeout"
    # the timeout is ours, not Prefect's, which would warn that it cannot interrupt a blocking call
    assert "cannot interrupt" not in "".join(capfd.readouterr())
    # nothing of the stopped stage holds the project (DVC's locks included): the next run goes ahead.
    # It gets a timeout that only a hang reaches: `dvc repro` alone can take over 2 s on a busy
    # 2-core machine (a second pytest-xdist worker is enough), and that is not what this checks
    (root / "params.yaml").write_text(yaml.safe_dump({"run": {"retries": 0, "retry_delay_s": 0,
                                                              "stage_timeout_s": 120}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {"cmd": "echo ok > out.txt",
                                                                          "outs": ["out.txt"]}}}))
    assert run_pipeline(root, ("ingest",))[0].ok


def test_a_stage_that_fails_or_runs_past_its_time_gets_its_last_good_outputs_back(harness, tmp_path):
    """DVC deletes a stage's outputs before running it: after the failure they are put back as dvc.lock
    records them (from the DVC cache), not left missing until the next good run."""
    root = _repo(tmp_path / "p", "if [ -f hang ]; then sleep 300; fi; test ! -f fail && date +%s%N > out.txt "
                 "&& echo run >> store.txt", retries=0, stage_timeout_s=120)
    # a persist output (like the online store) is not deleted before a run and may move on after it:
    # it is never put back
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {
        "cmd": yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["ingest"]["cmd"],
        "outs": ["out.txt", {"store.txt": {"persist": True}}]}}}))
    assert run_pipeline(root, ("ingest",))[0].ok
    good = (root / "out.txt").read_text()
    with (root / "store.txt").open("a") as store:
        store.write("pushed\n")
    (root / "fail").touch()
    with pytest.raises(StageFailed, match="failed"):
        run_pipeline(root, ("ingest",), force=True)           # no deps: unchanged, it would be skipped
    assert (root / "out.txt").read_text() == good
    assert (root / "store.txt").read_text() == "run\npushed\n"
    (root / "fail").unlink()
    (root / "hang").touch()
    (root / "params.yaml").write_text(yaml.safe_dump({"run": {"retries": 0, "retry_delay_s": 0,
                                                              "stage_timeout_s": 3}}))
    with pytest.raises(StageFailed, match="ran past"):
        run_pipeline(root, ("ingest",), force=True)
    assert (root / "out.txt").read_text() == good
    assert (root / "store.txt").read_text() == "run\npushed\n"


PARAMS_TEXT = """# the shared params: comments and layout must survive every run
run:
  retries: 0        # no retries here
  retry_delay_s: 0
gate:
  max_quality_drop: 0.01
"""


def _params_repo(root: Path, cmd: str) -> Path:
    """A stage that declares the gate params and copies the params file it was given."""
    _repo(root, "true")
    (root / "params.yaml").write_text(PARAMS_TEXT)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {
        "cmd": cmd, "params": ["gate"], "outs": ["out.txt"]}}}))
    return root


def _locked_gate(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]["params"]["params.yaml"]["gate"]


def test_overrides_reach_the_stage_and_dvc_lock_but_never_params_yaml(harness, tmp_path):
    root = _params_repo(tmp_path / "p", 'cp "$TOWERFLOW_RUN_PARAMS" seen.yaml && date +%s%N > out.txt')
    forced = ["gate.max_quality_drop=0.5", *_force_overrides(True, "a data fix: see #42")]
    assert run_pipeline(root, ("ingest",), overrides=forced)[0].ran
    assert (root / "params.yaml").read_text() == PARAMS_TEXT            # byte for byte
    seen = yaml.safe_load((root / "seen.yaml").read_text())["gate"]
    assert seen["max_quality_drop"] == 0.5 and seen["force"] is True
    locked = _locked_gate(root)                                         # dvc.lock records what the run used
    assert locked["max_quality_drop"] == 0.5 and locked["force"] is True
    assert locked["force_reason"] == "a data fix: see #42"
    # the next run without overrides is not forced: its params come from params.yaml again
    assert run_pipeline(root, ("ingest",))[0].ran
    assert not yaml.safe_load((root / "seen.yaml").read_text())["gate"].get("force")
    assert not _locked_gate(root).get("force") and _locked_gate(root)["max_quality_drop"] == 0.01
    assert (root / "params.yaml").read_text() == PARAMS_TEXT


def test_a_paths_override_is_refused_in_one_line(tmp_path):
    from flows.errors import ConfigError
    from flows.run_params import write_run_params

    root = _params_repo(tmp_path / "p", "true")
    with pytest.raises(ConfigError, match=r"--set paths.model: paths.\* decide where dvc.yaml's outputs are"):
        write_run_params(root, ["paths.model=elsewhere"])


def test_a_push_process_starts_only_with_a_default_remote(tmp_path, monkeypatch):
    """The run pushes its outputs to core.remote from any level DVC reads (the repo's config or
    config.local); with neither a remote nor the cache's collection to do (run.keep_cache: all) it
    starts no process (~1 s of CPU for nothing)."""
    import flows.pipeline as pipeline
    from flows.params import RunParams
    from flows.reproduce import default_remote

    root = _repo(tmp_path / "p", "echo ok > out.txt")
    run([DVC, "repro"], root)
    (root / RUN_PARAMS.parent).mkdir(parents=True)        # where the flow's processes write their outcome
    started: list[list[str]] = []
    real = pipeline._in_own_process

    def spy(root_: Path, action: str, timeout_s: float, flags: list[str]):  # noqa: ANN202 - records, then the real call
        started.append([action, *flags])
        return real(root_, action, timeout_s, flags)

    monkeypatch.setattr(pipeline, "_in_own_process", spy)
    keep_all = RunParams(keep_cache="all")
    assert default_remote(root) is None and pipeline._finish(root, keep_all) == pipeline.Finished()
    assert started == []
    finished = pipeline._finish(root, RunParams())
    assert finished.remote is None and finished.gc["removed"] == 0 and finished.gc["kept_bytes"] == 3
    assert started == [["finish", "--gc", "--succeeded"]]
    run([DVC, "remote", "add", "-d", "store", str(tmp_path / "store")], root)
    run([DVC, "remote", "add", "--local", "-d", "mine", str(tmp_path / "mine")], root)
    assert default_remote(root) == "mine"                     # config.local wins, as in `dvc push`
    assert pipeline._finish(root, keep_all) == pipeline.Finished("mine", 1)
    assert started[-1] == ["finish", "--push", "--succeeded"]
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "store").exists()
    # after a failed run: the collection, never a push
    assert pipeline._finish(root, keep_all, succeeded=False) == pipeline.Finished() and len(started) == 2
    assert pipeline._finish(root, RunParams(), succeeded=False).remote is None
    assert started[-1] == ["finish", "--gc"]


def test_the_process_that_reproduces_a_stage_starts_without_the_params_models():
    """Every stage of every run (up-to-date ones included) starts a flows/reproduce.py process: it
    imports DVC when it runs, and not flows.params' pydantic models (0.3 s a stage), which the stage
    command it starts loads itself."""
    from tests.fresh import modules_imported

    loaded, _ = modules_imported("import flows.reproduce", ("flows.params", "pydantic"), timeout=60)
    assert loaded == []


RUN_SCRIPT = """
import atexit, sys
from pathlib import Path
from flows.pipeline import run_pipeline
atexit.register(lambda: Path(sys.argv[1], "exit-handlers-ran").touch())
run_pipeline(Path(sys.argv[1]), ("ingest",), overrides=["gate.force=true", "gate.force_reason=x"])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_run_stopped_mid_stage_leaves_params_yaml_and_no_stage_behind(harness, tmp_path, sig):
    """SIGTERM: the run ends through its exit handlers, with code 143. Prefect answers a SIGTERM by
    crashing the flow and sending the signal again; the default handler then ended the process on the
    spot, and the temporary API server Prefect starts without PREFECT_API_URL (a uvicorn process its
    exit handler stops) ran on, orphaned, after every stopped `towerflow run` (checked by hand with
    that server: nothing left now; here the test harness's server keeps the test fast). kill -9: the
    stage stops itself."""
    from prefect.settings import PREFECT_API_URL

    root = _params_repo(tmp_path / "p", "if [ -f slow ]; then echo $$ > stage.pid; sleep 300; fi; "
                                        "date +%s%N > out.txt")
    run_pipeline(root, ("ingest",))
    good = (root / "out.txt").read_text()
    (root / "slow").touch()
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(root)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (root / "stage.pid").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (root / "stage.pid").exists(), "the stage never started"
        stage_pid = int((root / "stage.pid").read_text())
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
        assert (root / "exit-handlers-ran").exists()
    assert (root / "params.yaml").read_text() == PARAMS_TEXT
    deadline = time.monotonic() + 15      # the stage's process notices its run is gone within ~1 s
    while _alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stage_pid), "the stage ran on after its run was stopped"
    # a stopped run puts back the outputs DVC deleted before the stage ran; a killed one cannot
    if sig == signal.SIGTERM:
        assert (root / "out.txt").read_text() == good
    else:
        assert not (root / "out.txt").exists()
    # and the next run is not forced: it writes its own params from params.yaml
    from flows.run_params import RUN_PARAMS, write_run_params
    write_run_params(root, [])
    assert not yaml.safe_load((root / RUN_PARAMS).read_text())["gate"].get("force")


def test_a_finetune_reruns_train_when_the_live_version_changed(tmp_path):
    """DVC does not track the live bundle: the flow reruns train when this run fine-tunes and the
    workspace model was fine-tuned from another version than the one live now."""
    import json

    from flows.params import load_params
    from flows.pipeline import finetune_refresh

    root = _params_repo(tmp_path / "p", "true")
    metrics = root / "artifacts/model/train_metrics.json"     # as the train stage writes it
    metrics.parent.mkdir(parents=True)
    finetune = load_params(root / "params.yaml", ["train.update=finetune"])
    stages = ["train"]

    metrics.write_text(json.dumps({"full": {"update": {"mode": "finetune", "from_version": "v1"}}}))
    assert "fine-tunes the live version v2" in finetune_refresh(root, finetune, stages, "v2")["train"]
    metrics.write_text(json.dumps({"full": {"update": {"mode": "finetune", "from_version": "v2"}}}))
    assert finetune_refresh(root, finetune, stages, "v2") == {}
    assert finetune_refresh(root, finetune, stages, None) == {}            # nothing live: train decides
    metrics.unlink()                                    # no model yet (or a full one): train runs anyway
    assert "train" in finetune_refresh(root, finetune, stages, "v2")
    assert finetune_refresh(root, load_params(root / "params.yaml"), stages, "v2") == {}    # update: full
    assert finetune_refresh(root, finetune, ["ingest"], "v2") == {}                        # not running train


# --- the DVC cache after a run (run.keep_cache) ---

def _cached(root: Path, cache: Path | None = None) -> set[str]:
    """The DVC cache's objects, as md5 hashes."""
    files = (cache or root / ".dvc" / "cache") / "files" / "md5"
    return {p.parent.name + p.name for p in files.glob("*/*")}


def _out_md5(root: Path) -> str:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]["outs"][0]["md5"]


def test_a_run_leaves_in_the_cache_only_what_a_version_or_the_workspace_uses(harness, tmp_path, caplog):
    """A nightly run's outputs went into the DVC cache every night and stayed, committed or not: with
    run.keep_cache at its default (versioned) a run removes those of earlier runs that no git commit,
    branch, tag or experiment records, and keeps its own and every committed one, which checks out."""
    root = _repo(tmp_path / "p", "cat src.txt > out.txt")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {
        "cmd": "cat src.txt > out.txt", "deps": ["src.txt"], "outs": ["out.txt"]}}}))
    # the demo's remote: a folder inside the project (.dvc/config: url = ../dvc-remote), only its own
    run([DVC, "remote", "add", "-d", "own", "dvc-remote"], root)
    (root / ".gitignore").write_text("/dvc-remote/\n")
    own = root / "dvc-remote"

    def night(text: str) -> str:
        (root / "src.txt").write_text(text * 10_000)
        assert run_pipeline(root, ("ingest",))[0].ran
        return _out_md5(root)

    first = night("first ")                      # a repo with no commit yet: the workspace is kept
    assert first in _cached(root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "the first night, versioned"], root)
    second = night("second ")                    # never committed
    assert {first, second} <= _cached(root)
    run(["git", "tag", "t-second-on-disk"], root)   # a tag of the first commit: nothing new is kept by it
    caplog.clear()
    third = night("third ")
    assert first in _cached(root) and third in _cached(root)
    assert second not in _cached(root), "the uncommitted run replaced since was kept"
    assert "DVC cache: removed 1 file(s)" in caplog.text
    assert {first, third} <= _cached(root, own) and second not in _cached(root, own)
    assert "DVC remote (a folder of this project): removed 1 file(s)" in caplog.text
    # the committed run still checks out, byte for byte; the workspace's outputs are as the run left them
    work = tmp_path / "copy"
    run(["git", "clone", "-q", str(root), str(work)], tmp_path)
    run([DVC, "cache", "dir", str(root / ".dvc" / "cache")], work)
    run([DVC, "checkout"], work)
    assert (work / "out.txt").read_text() == "first " * 10_000
    assert json.loads(run([DVC, "status", "--json"], root).stdout or "{}") == {}

    # a branch's run is a version too; and with keep_cache: all nothing goes
    run(["git", "checkout", "-qb", "experiment"], root)
    fourth = night("fourth ")                    # the third night's (uncommitted) goes
    assert third not in _cached(root)
    run(["git", "commit", "-qam", "the fourth night, on a branch"], root)
    run(["git", "checkout", "-q", "-"], root)
    run([DVC, "checkout", "--force"], root)
    (root / "params.yaml").write_text(yaml.safe_dump({"run": {"retries": 0, "keep_cache": "all"}}))
    fifth = night("fifth ")
    sixth = night("sixth ")
    assert {first, fourth, fifth, sixth} <= _cached(root)
    (root / "params.yaml").write_text(yaml.safe_dump({"run": {"retries": 0}}))
    seventh = night("seventh ")
    assert {first, fourth} <= _cached(root) and not {fifth, sixth} & _cached(root)
    # a versioned run deep in the history (not a branch's or tag's tip) stays too, however many
    # commits came after it
    run(["git", "commit", "-qam", "the seventh night"], root)
    for n in range(3):
        (root / "notes.md").write_text(f"code, not data {n}")
        run(["git", "add", "notes.md"], root)
        run(["git", "commit", "-qm", f"code {n}"], root)
    run(["git", "tag", "-d", "t-second-on-disk"], root)
    night("eighth ")
    assert {first, fourth, seventh} <= _cached(root)

    assert {first, fourth, seventh} <= _cached(root, own)
    # a remote elsewhere (S3, a shared folder) may hold what other clones' commits use: kept
    elsewhere = tmp_path / "team-remote"
    run([DVC, "remote", "add", "-d", "team", str(elsewhere)], root)
    ninth, tenth = night("ninth "), night("tenth ")
    assert {ninth, tenth} <= _cached(root, elsewhere) and ninth not in _cached(root)
    # and so is a cache outside the project (cache.dir, maybe shared with other projects)
    shared = tmp_path / "shared-cache"
    run([DVC, "cache", "dir", str(shared)], root)
    eleventh, twelfth = night("eleventh "), night("twelfth ")
    assert {eleventh, twelfth} <= _cached(root, shared)
    assert "DVC cache not collected: the DVC cache" in caplog.text and "outside this project" in caplog.text


def test_a_run_the_gate_stops_is_blocked_and_collects_the_cache_too(harness, tmp_path, caplog):
    """A gate that blocks exits with 3 (`towerflow stage gate`: tests/stages/test_gate_stage.py): the
    run is then Blocked (GateBlocked: `towerflow run` exits with 3 too), not retried, not a broken
    run. And a week of nightly runs the gate stops must not keep a week of outputs: a run whose later
    stage fails collects as a successful one does, and keeps what its own stages made and recorded."""
    root = _repo(tmp_path / "p", "true", retries=2)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "ingest": {"cmd": "echo x >> ran; cat src.txt > out.txt", "deps": ["src.txt"], "outs": ["out.txt"]},
        "gate": {"cmd": "echo x >> tries; test ! -f blocked || exit 3", "deps": ["out.txt"]}}}))
    # before any successful run has been recorded (a new project, or one from before the record):
    # nothing is collected, so a live run's outputs are never lost to the first blocked run
    (root / "src.txt").write_text("zeroth " * 10_000)
    (root / "blocked").touch()
    caplog.clear()
    with pytest.raises(GateBlocked):
        run_pipeline(root, ("ingest", "gate"))
    assert "DVC cache" not in caplog.text
    (root / "blocked").unlink()
    (root / "src.txt").write_text("first " * 10_000)
    assert all(r.ok for r in run_pipeline(root, ("ingest", "gate")))
    first = _out_md5(root)
    (root / "src.txt").write_text("second " * 10_000)
    (root / "blocked").touch()
    caplog.clear()
    with pytest.raises(GateBlocked, match="stage 'gate' failed"):
        run_pipeline(root, ("ingest", "gate"))
    assert "gate: blocked in" in caplog.text and len((root / "tries").read_text().split()) == 3
    second = _out_md5(root)
    assert {first, second} <= _cached(root)     # the last successful run's outputs stay: to go back to
    (root / "src.txt").write_text("third " * 10_000)
    caplog.clear()
    with pytest.raises(GateBlocked):
        run_pipeline(root, ("ingest", "gate"))
    third = _out_md5(root)
    assert {first, third} <= _cached(root) and second not in _cached(root)
    assert "DVC cache: removed 1 file(s)" in caplog.text
    # going back to the last good run's data: DVC's run cache restores its output, the stage does not run
    (root / "src.txt").write_text("first " * 10_000)
    (root / "blocked").unlink()
    assert all(r.ok for r in run_pipeline(root, ("ingest", "gate")))
    assert _out_md5(root) == first and len((root / "ran").read_text().split()) == 4
    (root / "params.yaml").write_text(yaml.safe_dump({"run": {"retries": 0}}))
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text().replace("exit 3", "exit 1"))
    (root / "blocked").touch()
    with pytest.raises(StageFailed) as failed:              # any other failure is not a block
        run_pipeline(root, ("ingest", "gate"))
    assert not isinstance(failed.value, GateBlocked)


def test_only_commits_that_can_name_an_output_are_read(tmp_path):
    """DVC reads 0.3 s a commit: the collection reads those that changed a file DVC takes its outputs
    from and hold a dvc.lock or a .dvc file. The demo's history has 127 commits that edit dvc.yaml or
    params.yaml and none with a dvc.lock: its run's collection took 23.8 s before this, 2.4 s after."""
    from flows.reproduce import versioned_revisions

    root = tmp_path / "p"
    root.mkdir()
    git_dvc_repo(root)

    def commit(name: str, text: str) -> str:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-qm", name], root)
        return run(["git", "rev-parse", "HEAD"], root).stdout.strip()

    assert versioned_revisions(root) == []                       # no commit yet
    commit("dvc.yaml", "stages: {}\n")                            # no lock: names no output
    commit("params.yaml", "a: 1\n")
    commit("flows/code.py", "x = 1\n")
    locked = commit("dvc.lock", "schema: '2.0'\n")
    edited = commit("params.yaml", "a: 2\n")                      # beside a lock: read
    commit("flows/code.py", "x = 2\n")                            # code: uses what `edited` uses
    run(["git", "checkout", "-qb", "side"], root)
    added = commit("data/raw.csv.dvc", "outs: []\n")              # `dvc add` data on a branch
    run(["git", "checkout", "-q", "-"], root)
    assert sorted(versioned_revisions(root)) == sorted([locked, edited, added])
