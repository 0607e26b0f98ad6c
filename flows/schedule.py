"""Scheduled runs: a Prefect deployment of the pipeline flow, and a foreground process serving it.

`towerflow schedule` registers the deployment `towerflow/<name>` (cron or interval; the project root
and the deployment's own `--set` overrides as its parameters) with the Prefect API: the server at
PREFECT_API_URL when set, else the project's own database under .prefect/. One project can have
several, e.g. a nightly full retrain and an hourly `train.update=finetune`: each run applies its
deployment's overrides through the run's own params file (flows/run_params.py, never params.yaml),
and the run lock serializes them (a scheduled run waits up to run.lock_wait_s for the one before it).
`towerflow serve` reads the deployments back and serves them in the foreground (Prefect's `serve`):
it starts the scheduled runs and any run triggered from the UI, the API or `prefect deployment run`. To run on infrastructure instead, see README "Scheduled runs"
(a work pool + `prefect worker start`); the flow's entrypoint is `flows.pipeline.towerflow_pipeline`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import serve as prefect_serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.errors import ConfigError
from flows.params import load_params
from flows.pipeline import towerflow_pipeline
from flows.run_params import check_overrides

FLOW_NAME = "towerflow"


def deployment(root: Path, name: str, cron: str | None = None, interval_s: float | None = None,
               stages: list[str] | None = None, overrides: list[str] | None = None) -> RunnerDeployment:
    """The pipeline of the project at `root` as a deployment named `name`, on a cron or an interval,
    its runs with `overrides` (--set key=value) applied, waiting for the run lock."""
    if (cron is None) == (interval_s is None):
        raise ConfigError("give exactly one of --cron or --interval")
    if interval_s is not None and interval_s <= 0:
        raise ConfigError(f"--interval must be a positive number of seconds, got {interval_s:g}")
    if cron is not None:
        _check_cron(cron)
    check_overrides(overrides or [])
    load_params(root / "params.yaml", overrides)   # a bad key or value fails now, not at 3 am
    parameters: dict[str, Any] = {"root": str(root.resolve()), "wait_for_lock": True}
    if stages:
        parameters["stages"] = stages
    if overrides:
        parameters["overrides"] = list(overrides)
    return towerflow_pipeline.to_deployment(
        name=name, cron=cron, interval=timedelta(seconds=interval_s) if interval_s else None,
        parameters=parameters, description=f"towerflow pipeline of {root.resolve()}",
        # by module, not file path: the runner loads it from the installed package wherever it starts
        entrypoint_type=EntrypointType.MODULE_PATH)


def _check_cron(cron: str) -> None:
    try:
        CronSchedule(cron=cron)     # Prefect's own parser: what the server would refuse
    except ValueError:
        raise ConfigError(f"--cron {cron!r} is not a valid cron expression (e.g. \"0 3 * * *\")") from None


def create(root: Path, name: str, cron: str | None, interval_s: float | None,
           stages: list[str] | None = None, overrides: list[str] | None = None) -> str:
    """Register (or update) the deployment; returns its id."""
    return str(deployment(root, name, cron, interval_s, stages, overrides).apply())


def _runner_environment(root: Path) -> None:
    """The project's run.task_runner, for the flow runs this process starts (flows/pipeline.py)."""
    cfg = load_params(root / "params.yaml").run
    os.environ["TOWERFLOW_TASK_RUNNER"] = cfg.task_runner
    if cfg.task_runner_address:
        os.environ["TOWERFLOW_TASK_RUNNER_ADDRESS"] = cfg.task_runner_address


def serve(names: list[str]) -> None:
    """Serve the registered deployments `towerflow/<name>` in the foreground until interrupted (one
    process: their runs start as subprocesses and take turns on the run lock)."""
    registered = [_read(name) for name in names]
    _runner_environment(Path(registered[0].parameters["root"]))
    deployments = [towerflow_pipeline.to_deployment(
        name=d.name, schedules=[s.schedule for s in d.schedules], parameters=d.parameters,
        description=d.description, entrypoint_type=EntrypointType.MODULE_PATH) for d in registered]
    # Prefect's Runner makes <temp>/runner_storage/<uuid> and means to remove it on the way out, but
    # stopped by Ctrl-C or SIGTERM it never gets there: one folder was left per `towerflow serve`. Its
    # temp folder is this process's own one, removed here however serve ends (the flow runs it starts
    # are processes of their own, with the temp folder they inherit).
    own_temp, before = Path(tempfile.mkdtemp(prefix="towerflow-serve-")), tempfile.tempdir
    tempfile.tempdir = str(own_temp)
    try:
        prefect_serve(*deployments, print_starting_message=True)
    finally:
        tempfile.tempdir = before
        shutil.rmtree(own_temp, ignore_errors=True)


def _read(name: str):  # noqa: ANN202 - a prefect DeploymentResponse
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        except Exception as exc:   # ObjectNotFound, or the API is not reachable
            raise ConfigError(f"no deployment '{FLOW_NAME}/{name}' ({type(exc).__name__}): create it with "
                              f"`towerflow schedule --name {name} --cron ...`") from exc
