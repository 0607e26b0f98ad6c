"""The Prefect flow: runs the DVC stages in order, one task each.

Each task reproduces its own DVC stage through DVC's API, so DVC owns caching and dvc.lock (a stage
whose deps and params are unchanged is skipped) and Prefect owns orchestration, retries, timeouts,
logs and schedules. DVC runs the stage's `cmd` (`towerflow stage <name>`), the same code a user runs
alone. The flow is a module-level object so that a deployment (`towerflow schedule`/`serve`, or a
work pool worker) can load it from its entrypoint `flows/pipeline.py:towerflow_pipeline`.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from dvc.exceptions import DvcException
from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from prefect.states import Failed
from prefect.tasks import exponential_backoff

from flows.errors import TRANSIENT_EXIT, ConfigError, StageFailed
from flows.params import Params, RunParams, apply_overrides, load_params, read_raw, resolve_source
from flows.portal.run import build_run_portal
from flows.run_lock import run_lock
from flows.stages.ingest import source_changed
from flows.stages.registry import STAGES

class TransientStageFailure(RuntimeError):
    """A stage failed in a way a retry may fix; raised so that the Prefect task retries it."""


@dataclass
class StageRun:
    stage: str
    ran: bool
    seconds: float
    ok: bool = True
    error: str = ""


def _reproduce(root: Path, name: str, force: bool) -> StageRun:
    # DVC prints its own progress; without this Prefect's root handler prints every line twice.
    logging.getLogger("dvc").propagate = False
    t0 = time.perf_counter()
    try:
        # DVC resolves targets and stage paths against the working directory.
        with _working_directory(root), Repo(".") as repo:
            repo.scm_context.quiet = True  # one "git add dvc.lock" hint at the end, not one per stage
            changed = repo.reproduce(targets=[name], single_item=True, force=force)
    except DvcException as exc:
        # The stage printed its own one-line error; DVC's message says which stage and command.
        cause = exc.__cause__ or exc
        if f"exited with {TRANSIENT_EXIT}" in str(cause):
            raise TransientStageFailure(f"stage '{name}' failed and may pass on a retry: {cause}") from exc
        return StageRun(name, False, time.perf_counter() - t0, ok=False,
                        error=f"stage '{name}' failed: {cause}")
    return StageRun(name, bool(changed), time.perf_counter() - t0)


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _stage_task(name: str, cfg: RunParams):  # noqa: ANN202 - a prefect Task
    """The reproduce task of one stage, with the run section's retries and timeout. Only transient
    failures raise (and so are retried); a stage that failed on its data returns a failed StageRun."""
    return task(_reproduce, name=name, retries=cfg.retries, timeout_seconds=cfg.stage_timeout_s,
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
def towerflow_pipeline(root: str, stages: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Reproduce `stages` (default: all) of the project at `root`, in order; stop at the first failure.
    One run at a time per project: a second one is refused while the first holds the run lock."""
    project = Path(root)
    put_venv_on_path()   # a deployment's run starts in a fresh process: DVC must find `towerflow`
    names = list(stages or STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        return Failed(message=f"unknown stages {unknown}; stages are: {', '.join(STAGES)}")
    params = load_params(project / "params.yaml")
    with run_lock(project):
        runs, error = _run_stages(project, names, force, params)
        _portal(params, project)        # after every run, blocked and failed ones included
        if error:
            return Failed(message=error, data=runs)  # a failed run, without a traceback
        pushed = _push_task(params.run)(project)
        if pushed is not None:
            get_run_logger().info("pushed %d file(s) to the DVC remote '%s'", pushed[1], pushed[0])
    return runs


def _run_stages(project: Path, names: list[str], force: bool, params: Params) -> tuple[list[dict[str, Any]], str]:
    """Reproduce the stages in order; (the runs, the first failure's message or "")."""
    runs: list[dict[str, Any]] = []
    refresh = _source_refresh(project, params) if "ingest" in names and not force else set()
    if refresh:
        get_run_logger().info("ingest: the source directory's files changed since the last ingest")
    for name in names:
        # submitted: with a Dask or Ray task runner (run.task_runner) the stage runs on a worker
        run = _stage_task(name, params.run).submit(project, name, force or name in refresh).result()
        runs.append(asdict(run))
        get_run_logger().info("%s: %s in %.1fs", name, "ran" if run.ran else "up to date", run.seconds)
        if not run.ok:
            return runs, run.error
    return runs, ""


def _portal(params: Params, project: Path) -> None:
    try:
        get_run_logger().info("report portal: %s", build_run_portal(params, project))
    except Exception as exc:   # the portal is a view of the outputs: it must not fail the run
        get_run_logger().warning("report portal not built: %s: %s", type(exc).__name__, exc)


def _push(root: Path) -> tuple[str, int] | None:
    """After a successful run, push the outputs to the default DVC remote when one is set (so any run
    can be restored elsewhere with `dvc pull`); (remote, files pushed), or None without a remote."""
    with _working_directory(root), Repo(".") as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            return None
        return remote, repo.push()


def _push_task(cfg: RunParams):  # noqa: ANN202 - a prefect Task
    # network I/O: every failure here is worth a retry (a failed push leaves the run's outputs intact)
    return task(_push, name="dvc-push", retries=cfg.retries, timeout_seconds=cfg.stage_timeout_s,
                retry_delay_seconds=exponential_backoff(backoff_factor=cfg.retry_delay_s) if cfg.retries else 0)


def _source_refresh(root: Path, params: Params) -> set[str]:
    """{"ingest"} when a source directory's files changed since they were ingested: DVC tracks the
    `data` params, not the files of the directory they name (flows/stages/ingest.py)."""
    changed = source_changed(resolve_source(params.data, root), params.paths.resolved(root).cache,
                             root / params.serve.events_dir)
    return {"ingest"} if changed else set()


@contextmanager
def params_overridden(params_path: Path, overrides: list[str]) -> Iterator[None]:
    """Apply --set overrides to params.yaml for the duration of one run, then restore the file.

    DVC reads params.yaml, so the override must be there for dvc.lock to record the values the run
    used; afterwards `dvc status` truthfully shows that the workspace params differ from that run.
    """
    if not overrides:
        yield
        return
    original = params_path.read_text()
    params_path.write_text(yaml.safe_dump(apply_overrides(read_raw(params_path), overrides),
                                          sort_keys=False))
    try:
        yield
    finally:
        params_path.write_text(original)


def put_venv_on_path() -> None:
    """DVC runs `towerflow stage ...` in a shell: make this interpreter's scripts resolvable."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def run_pipeline(root: Path, stages: tuple[str, ...] = STAGES, overrides: list[str] | None = None,
                 force: bool = False) -> list[StageRun]:
    """Run the Prefect flow over the DVC stages; raise StageFailed on the first failing stage."""
    with params_overridden(root / "params.yaml", overrides or []):
        runner = task_runner(load_params(root / "params.yaml").run)
        flow_ = towerflow_pipeline.with_options(task_runner=runner)
        state = flow_(str(root), list(stages), force, return_state=True)
    data = state.result(raise_on_failure=False)
    if state.is_failed():
        if isinstance(data, BaseException) and not isinstance(data, TransientStageFailure):
            raise data
        raise StageFailed(state.message or "pipeline failed")
    return [StageRun(**d) for d in data]
