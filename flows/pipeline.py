"""The Prefect flow: runs the DVC stages in order, one task each.

Each task reproduces its own DVC stage through DVC's API, in a process group of its own
(flows/reproduce.py) that run.stage_timeout_s stops with everything it started; DVC owns caching and
dvc.lock (a stage whose deps and params are unchanged is skipped) and Prefect owns orchestration,
retries, logs and schedules. DVC runs the stage's `cmd` (`towerflow stage <name>`), the same code a
user runs alone. A run's --set overrides reach the stages in the run's own params file
(flows/run_params.py); params.yaml is never written. The flow is a module-level object so that a deployment (`towerflow schedule`/`serve`, or a
work pool worker) can load it from its entrypoint `flows/pipeline.py:towerflow_pipeline`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Failed
from prefect.tasks import exponential_backoff

from flows.environment import telemetry_off
from flows.errors import ConfigError, GateBlocked, StageFailed
from flows.fork_server import ForkServerGone, server_for, serving
from flows.params import Params, RunParams, load_params, resolve_source
from flows.process_groups import Leader, sigterm_exits, stop_group
from flows.portal.run import build_run_portal
from flows.reproduce import LAST_SUCCESS, PRELOAD, default_remote
from flows.run_lock import run_lock
from flows.run_params import RUN_PARAMS, write_run_params
from flows.serving.store import BundleStore
from flows.stages.ingest import source_changed
from flows.stages.registry import STAGES

# The name of the failed state of a run the gate stopped
BLOCKED = "Blocked"


class TransientStageFailure(RuntimeError):
    """A stage failed in a way a retry may fix; raised so that the Prefect task retries it."""


@dataclass
class StageRun:
    stage: str
    ran: bool
    seconds: float
    ok: bool = True
    error: str = ""
    blocked: bool = False      # the gate stopped the run's model (flows/errors.py BLOCKED_EXIT)


def _reproduce(root: Path, name: str, force: bool, timeout_s: float) -> StageRun:
    """Reproduce the DVC stage `name` in a process group of its own (flows/reproduce.py), stopped with
    every process in it when it runs past timeout_s."""
    t0 = time.perf_counter()
    outcome, why = _in_own_process(root, name, timeout_s, ["--force"] if force else [])
    seconds = time.perf_counter() - t0
    if outcome is None or not outcome["ok"]:    # failed, stopped, or ran past its time
        restore_outputs(root, name, timeout_s)
    if outcome is None:
        return StageRun(name, False, seconds, ok=False, error=f"stage '{name}' {why}")
    if outcome.get("transient"):
        raise TransientStageFailure(f"stage '{name}' failed and may pass on a retry: {outcome['error']}")
    if not outcome["ok"]:
        return StageRun(name, False, seconds, ok=False, error=f"stage '{name}' failed: {outcome['error']}",
                        blocked=outcome.get("blocked", False))
    return StageRun(name, outcome["ran"], seconds)


def restore_outputs(root: Path, name: str, timeout_s: float) -> None:
    """Put back the outputs of stage `name`'s last successful run (dvc.lock) that DVC deleted before
    running it (flows/reproduce.py `_restore`), and say so in the run's log. Also on a stopped run: the
    worker thread that waited for the stage does this before the process ends (a kill -9 cannot)."""
    outcome, why = _in_own_process(root, name, timeout_s, ["--restore"])
    logger = get_run_logger()
    if outcome is None or not outcome["ok"]:
        logger.warning("%s: its outputs of the last successful run were not put back (%s); `dvc checkout %s` "
                       "restores them from the DVC cache", name, why or outcome["error"], name)
    elif outcome["restored"]:
        logger.info("%s: put back its outputs of the last successful run (dvc.lock): %s", name,
                    ", ".join(outcome["restored"]))


def _in_own_process(root: Path, action: str, timeout_s: float,
                    extra: list[str]) -> tuple[dict[str, Any] | None, str]:
    """(the outcome flows/reproduce.py wrote, "") or (None, why there is none)."""
    result = root / RUN_PARAMS.parent / f"{action}.result.json"
    result.unlink(missing_ok=True)
    args = [str(root), action, str(result), str(os.getpid()), *extra]
    code = run_in_own_group(lambda: _start_reproduce(root, args), timeout_s)
    if code is None:
        return None, (f"ran past run.stage_timeout_s ({timeout_s:g} s): stopped it and the processes it "
                      "started")
    if not result.is_file():
        return None, f"failed: its process ended with exit code {code} before saying how it went"
    outcome = json.loads(result.read_text())
    result.unlink()
    return outcome, ""


# The stage process groups this process is waiting for, by leader pid. A stopped run (SIGTERM or
# Ctrl-C, raised in the flow's main thread) ends them: the worker thread waiting for a stage would
# otherwise keep the interpreter alive, and the stage running, until the stage ends by itself.
_RUNNING: dict[int, Leader] = {}


def _start_reproduce(root: Path, args: list[str]) -> Leader:
    """`python -m flows.reproduce args` in root as the leader of a new session: forked by the run's
    fork server (DVC imported already) when this process holds one, else a new interpreter."""
    server = server_for(root)
    if server is not None:
        with suppress(ForkServerGone):    # nothing started: start it the plain way
            return server.start("flows.reproduce", args, root)
    return subprocess.Popen([sys.executable, "-m", "flows.reproduce", *args], cwd=root, start_new_session=True)


def run_in_own_group(start: Callable[[], Leader], timeout_s: float) -> int | None:
    """Start the leader of a new process group (session); its exit code, or None when it ran past
    timeout_s. Then, or when this run is stopped, or when it leaves processes behind, the whole
    group is stopped: SIGTERM, and SIGKILL after flows/process_groups.py's STOP_GRACE_S."""
    proc = start()
    _RUNNING[proc.pid] = proc
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:   # also on an exception here: a stage never outlives the run that started it
        stop_group(proc)
        _RUNNING.pop(proc.pid, None)


def stop_running_stages() -> None:
    """Ask every stage group this process waits for to stop (their waiting threads finish the job)."""
    for pid in list(_RUNNING):
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)


def _stage_task(name: str, cfg: RunParams):  # noqa: ANN202 - a prefect Task
    """The reproduce task of one stage, with the run section's retries. Only transient failures raise
    (and so are retried); a stage that failed on its data or ran past its time returns a failed
    StageRun. No Prefect timeout: _reproduce enforces run.stage_timeout_s on the stage's processes."""
    return task(_reproduce, name=name, retries=cfg.retries,
                retry_delay_seconds=exponential_backoff(backoff_factor=cfg.retry_delay_s) if cfg.retries else 0)


def task_runner(cfg: RunParams):  # noqa: ANN201 - a prefect TaskRunner
    """The task runner run.task_runner names; a missing integration package is a one-line error."""
    if cfg.task_runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner
        return ThreadPoolTaskRunner()
    try:
        if cfg.task_runner == "dask":
            from prefect_dask import DaskTaskRunner
            return DaskTaskRunner(address=cfg.task_runner_address) if cfg.task_runner_address else DaskTaskRunner()
        from prefect_ray import RayTaskRunner
        return RayTaskRunner(address=cfg.task_runner_address) if cfg.task_runner_address else RayTaskRunner()
    except ImportError as exc:
        raise ConfigError(f"run.task_runner is {cfg.task_runner} but {exc.name} is not installed: "
                          f"pip install prefect-{cfg.task_runner}") from exc


def _runner_from_environment():  # noqa: ANN202 - a prefect TaskRunner
    """A deployment's run loads this module in a fresh process: `towerflow serve` passes the project's
    run.task_runner through these variables (the flow object cannot take it from params.yaml)."""
    return task_runner(RunParams(task_runner=os.environ.get("TOWERFLOW_TASK_RUNNER", "thread"),
                                 task_runner_address=os.environ.get("TOWERFLOW_TASK_RUNNER_ADDRESS") or None))


@flow(name="towerflow", task_runner=_runner_from_environment())
def towerflow_pipeline(root: str, stages: list[str] | None = None, force: bool = False,
                       overrides: list[str] | None = None, wait_for_lock: bool = False) -> list[dict[str, Any]]:
    """Reproduce `stages` (default: all) of the project at `root`, in order, with `overrides` (--set
    key=value) applied for this run only; stop at the first failure. One run at a time per project: a
    second one is refused while the first holds the run lock (a scheduled run, `wait_for_lock`, waits
    up to run.lock_wait_s for it instead). The lock comes first: nothing is written before it."""
    project = Path(root)
    put_venv_on_path()   # a deployment's run starts in a fresh process: DVC must find `towerflow`
    names = list(stages or STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        return Failed(message=f"unknown stages {unknown}; stages are: {', '.join(STAGES)}")
    wait_s = load_params(project / "params.yaml", list(overrides or [])).run.lock_wait_s if wait_for_lock else 0.0
    # the fork server imports DVC while the run gets ready; every reproduce process is a fork of it
    with run_lock(project, wait_s=wait_s), serving(project, PRELOAD):
        params = load_params(write_run_params(project, list(overrides or [])))
        if overrides:
            get_run_logger().info("this run's params: params.yaml with %s (%s)", ", ".join(overrides), RUN_PARAMS)
        try:
            runs, error = _run_stages(project, names, force, params)
        except BaseException:    # the run is being stopped (SIGTERM, Ctrl-C): its stage stops too
            stop_running_stages()
            raise
        _portal(params, project)        # after every run, blocked and failed ones included
        if error:
            _collect_after_failure(project, params.run)
            # a failed run, without a traceback; one the gate stopped is named so (Prefect's UI, a scheduler)
            return Failed(message=error, data=runs, name=BLOCKED if runs[-1]["blocked"] else "Failed")
        finished = _finish_task(params.run)(project, params.run)
        if finished.remote is not None:
            get_run_logger().info("pushed %d file(s) to the DVC remote '%s'", finished.pushed, finished.remote)
        if finished.gc:
            _log_gc(finished.gc)
    return runs


def _run_stages(project: Path, names: list[str], force: bool, params: Params) -> tuple[list[dict[str, Any]], str]:
    """Reproduce the stages in order; (the runs, the first failure's message or "")."""
    runs: list[dict[str, Any]] = []
    live = BundleStore(params.paths.resolved(project).published).live()
    refresh = {} if force else {**source_refresh(project, params, names),
                                **finetune_refresh(project, params, names, live)}
    for name, why in refresh.items():
        get_run_logger().info("%s: %s", name, why)
    for name in names:
        # submitted: with a Dask or Ray task runner (run.task_runner) the stage runs on a worker
        run = _stage_task(name, params.run).submit(project, name, force or name in refresh,
                                                   params.run.stage_timeout_s).result()
        runs.append(asdict(run))
        outcome = "blocked" if run.blocked else "failed" if not run.ok else "ran" if run.ran else "up to date"
        get_run_logger().info("%s: %s in %.1fs", name, outcome, run.seconds)
        if not run.ok:
            return runs, run.error
    return runs, ""


def _portal(params: Params, project: Path) -> None:
    try:
        get_run_logger().info("report portal: %s", build_run_portal(params, project))
    except Exception as exc:   # the portal is a view of the outputs: it must not fail the run
        get_run_logger().warning("report portal not built: %s: %s", type(exc).__name__, exc)


@dataclass
class Finished:
    """What the end of a successful run did: the push (remote None: none set) and the DVC cache's
    garbage collection (run.keep_cache; {} when not asked for)."""
    remote: str | None = None
    pushed: int = 0
    gc: dict[str, Any] = field(default_factory=dict)


def _finish(root: Path, cfg: RunParams, succeeded: bool = True) -> Finished:
    """At the end of a run, push the outputs to the default DVC remote when one is set (after a
    successful run only), then collect the DVC cache's garbage (run.keep_cache: versioned; a successful
    run's outputs are kept by later failed ones), both in one process group of their own, like a stage
    (timeout). No process to start (~1 s of CPU) when there is neither to do."""
    todo = ["push"] * (succeeded and default_remote(root) is not None) + ["gc"] * (cfg.keep_cache == "versioned")
    if not todo:
        return Finished()
    flags = [f"--{what}" for what in todo] + ["--succeeded"] * succeeded
    outcome, why = _in_own_process(root, "finish", cfg.stage_timeout_s, flags)
    if outcome is None:
        raise StageFailed(f"dvc {' and '.join(todo)} {why}")
    return Finished(outcome["remote"], outcome["pushed"] or 0, outcome.get("gc", {}))


def _finish_task(cfg: RunParams):  # noqa: ANN202 - a prefect Task
    # network I/O: every failure here is worth a retry (a failed push leaves the run's outputs intact)
    return task(_finish, name="dvc-push-gc", retries=cfg.retries,
                retry_delay_seconds=exponential_backoff(backoff_factor=cfg.retry_delay_s) if cfg.retries else 0)


def _collect_after_failure(root: Path, cfg: RunParams) -> None:
    """A run the gate stopped, or one whose stage failed, has cached what its stages made all the same:
    collect as after a success (what a failed stage got back is the workspace's, so it stays), or a
    week of blocked nightly runs keeps a week of outputs. The last successful run's outputs stay too
    (flows/reproduce.py LAST_SUCCESS): going back to its params after a blocked run restores train and
    rank from DVC's run cache. Until a successful run has left that record (a project's first runs, or
    its first after an upgrade) nothing is collected. No push: the remote gets successful runs. A
    failure here is a warning; the run's own failure is what it reports."""
    if not (root / LAST_SUCCESS).is_file():
        return
    try:
        finished = _finish_task(cfg)(root, cfg, succeeded=False)
    except Exception as exc:  # noqa: BLE001 - the run has failed already, on its own account
        get_run_logger().warning("DVC cache not collected: %s", exc)
        return
    if finished.gc:
        _log_gc(finished.gc)


def _log_gc(gc: dict[str, Any]) -> None:
    """One line in the run's log for the cache's garbage collection: a failure or a skip is a warning
    (the run has succeeded; the cache only keeps more than it needs)."""
    logger = get_run_logger()
    if "error" in gc:
        logger.warning("DVC cache not collected: %s", gc["error"])
    elif "skipped" in gc:
        logger.warning("DVC cache not collected: %s", gc["skipped"])
    else:
        logger.info("DVC cache: %s, of runs no version uses (run.keep_cache: versioned); %s kept (%.1f s)",
                    *_removed_and_kept(gc), gc["seconds"])
        if "remote" in gc:
            logger.info("DVC remote (a folder of this project): %s; %s kept", *_removed_and_kept(gc["remote"]))


def _removed_and_kept(change: dict[str, int]) -> tuple[str, str]:
    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"
    return f"removed {change['removed']} file(s), {size(change['freed_bytes'])}", size(change["kept_bytes"])


def source_refresh(root: Path, params: Params, names: list[str]) -> dict[str, str]:
    """{"ingest": why} when a source directory's files changed since they were ingested: DVC tracks
    the `data` params, not the files of the directory they name (flows/stages/ingest.py)."""
    if "ingest" not in names:
        return {}
    changed = source_changed(resolve_source(params.data, root), params.paths.resolved(root).cache,
                             root / params.serve.events_dir)
    return {"ingest": "the source directory's files changed since the last ingest"} if changed else {}


def finetune_refresh(root: Path, params: Params, names: list[str], live: str | None) -> dict[str, str]:
    """{"train": why} when this run fine-tunes and the model in the workspace was not fine-tuned from
    the version `live` (live now): DVC does not track the live bundle, so with unchanged data and
    params it would skip train, or restore from its run-cache a fine-tune of an earlier live model."""
    if "train" not in names or params.train.update != "finetune":
        return {}
    metrics = params.paths.resolved(root).model / "train_metrics.json"
    started = json.loads(metrics.read_text()).get("full", {}).get("update", {}) if metrics.is_file() else {}
    if live is None or started.get("from_version") == live:
        return {}
    return {"train": f"fine-tunes the live version {live} (the workspace model started from "
                     f"{started.get('from_version') or 'no live model'})"}


def put_venv_on_path() -> None:
    """DVC runs `towerflow stage ...` in a shell: make this interpreter's scripts resolvable."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def run_pipeline(root: Path, stages: tuple[str, ...] = STAGES, overrides: list[str] | None = None,
                 force: bool = False) -> list[StageRun]:
    """Run the Prefect flow over the DVC stages; raise StageFailed on the first failing stage.
    params.yaml is only read: the flow passes `overrides` to the stages in the run's own params file.
    Called from Python (not `towerflow run`), it still turns telemetry off before Prefect starts its
    temporary server for the flow."""
    telemetry_off()
    runner = task_runner(load_params(root / "params.yaml", overrides).run)
    flow_ = towerflow_pipeline.with_options(task_runner=runner)
    with sigterm_exits():
        state = flow_(str(root), list(stages), force, list(overrides or []), return_state=True)
    data = state.result(raise_on_failure=False)
    if state.is_failed():
        if isinstance(data, BaseException) and not isinstance(data, TransientStageFailure):
            raise data
        if state.name == BLOCKED:
            raise GateBlocked(state.message)       # `towerflow run` exits with BLOCKED_EXIT
        raise StageFailed(state.message or "pipeline failed")
    return [StageRun(**d) for d in data]
