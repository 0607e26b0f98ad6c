"""Commands that run the pipeline and look at its results: stage, run, schedule, serve, params,
ablate, bench, report."""
from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Optional

import typer
import yaml

from flows.errors import MissingStageInput, TowerflowError
from flows.params import resolve_source
from flows.stages.registry import STAGES

from flows.cli.common import ParamsOption, SetOption, _errors, _load, app

# a stage's per-step figures, printed under its one-line summary (materialize: where the time and
# the memory high-water went, what a user sizing a machine reads)
STEP_FIGURES = ("seconds_by_step", "peak_rss_mb_after_step")


@app.command()
def stage(name: str = typer.Argument(..., help="One of: " + ", ".join(STAGES)),
          set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption) -> None:
    """Run one stage in this process (dvc.yaml calls this)."""
    with _errors(stage=True):
        if name not in STAGES:
            raise TowerflowError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
        from flows.run_params import stage_params_file
        # started by a run: its own params file (params.yaml + the run's overrides, flows/run_params.py)
        params = _load(stage_params_file(params_file), set_)
        root = params_file.resolve().parent
        if name == "ingest":
            from flows.stages.ingest import check_source  # pyarrow: only when a run starts
            check_source(resolve_source(params.data, root))
        from flows.stages.registry import import_stage_libraries, run_stage
        t0 = time.perf_counter()             # the libraries' imports counted, as when the stage made them
        import_stage_libraries(name)
        summary = run_stage(name, params, root)
        typer.echo(f"{name}: done in {time.perf_counter() - t0:.1f}s {_brief(summary)}")
        for key in STEP_FIGURES:
            if isinstance(summary, dict) and isinstance(summary.get(key), dict):
                typer.echo(f"  {key}: {json.dumps(summary[key])}")


def _brief(summary: object) -> str:
    if not isinstance(summary, dict):
        return ""
    items = [f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str, bool))]
    return ("(" + ", ".join(items[:8]) + ")") if items else ""


@app.command()
def run(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
        rerun_all: bool = typer.Option(False, "--rerun-all", help="Rerun every stage even if up to date."),
        force: bool = typer.Option(False, "--force", help="Publish even if the gate blocks this run (needs --reason)."),
        reason: Optional[str] = typer.Option(None, "--reason",
                                             help="Why this run may pass the gate (recorded with who forced it)."),
        until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage.")) -> None:
    """Run the whole pipeline as a Prefect flow over the DVC stages (skips what is up to date)."""
    with _errors():
        overrides = (set_ or []) + _force_overrides(force, reason)
        from flows.run_params import check_overrides
        check_overrides(overrides)
        params = _load(params_file, overrides)  # bad keys or types fail here, before anything runs
        root = params_file.resolve().parent
        from flows.stages.ingest import check_source
        check_source(resolve_source(params.data, root))  # a broken data source stops the run before anything is written
        stages = tuple(_stages_until(until) or STAGES)
        from flows.pipeline import run_pipeline
        t0 = time.perf_counter()
        runs = run_pipeline(root, stages, overrides=overrides, force=rerun_all)
        _print_summary(runs, params, root, time.perf_counter() - t0)


def _force_overrides(force: bool, reason: Optional[str]) -> list[str]:
    """--force --reason as gate params, so that dvc.lock records who passed the gate and why."""
    if not force:
        if reason is not None:
            raise TowerflowError("--reason goes with --force (it says why the gate is overridden)")
        return []
    if not (reason or "").strip():
        raise TowerflowError("--force needs --reason TEXT: say why this run may publish past the gate")
    try:
        who = getpass.getuser()
    except (OSError, KeyError):   # no login name (a container without a passwd entry)
        who = "unknown"
    # JSON strings are YAML strings: a reason with ':' or '#' stays one string
    return ["gate.force=true", f"gate.force_reason={json.dumps(reason.strip())}",
            f"gate.forced_by={json.dumps(who)}"]


def _stages_until(until: Optional[str]) -> list[str] | None:
    if until is None:
        return None
    if until not in STAGES:
        raise TowerflowError(f"unknown stage '{until}' for --until; stages are: {', '.join(STAGES)}")
    return list(STAGES[: STAGES.index(until) + 1])


def _print_summary(runs, params, root: Path, total: float) -> None:  # noqa: ANN001
    paths = params.paths
    typer.echo("\nstage        status       seconds")
    for r in runs:
        typer.echo(f"{r.stage:<12} {'ran' if r.ran else 'up to date':<12} {r.seconds:7.1f}")
    typer.echo(f"{'total':<12} {'':<12} {total:7.1f}\n")
    typer.echo(f"model:    {paths.model / 'full'} (evaluation model: {paths.model / 'eval'})")
    from flows.serving.store import BundleStore
    served = BundleStore(root / paths.published).live() or "nothing published yet"
    typer.echo(f"live:     {served} ({paths.published}; `towerflow index list`)")
    typer.echo(f"metrics:  {paths.reports / 'metrics.json'}")
    _print_metrics(root / paths.reports / "metrics.json")
    _print_gate_warnings(root / paths.reports / "gate.json", any(r.ran and r.stage == "gate" for r in runs))
    _print_events(root / paths.ingested)
    typer.echo(f"review:   {paths.reports / 'index.html'} (one offline page: data checks, quality, drift, "
               f"gate, curves, what was published)")
    if any(r.ran for r in runs):
        typer.echo("dvc.lock records this run: `git add dvc.lock && git commit` to version it")


def _print_metrics(path: Path) -> None:
    """Each model's figures under the metrics line; a baseline the evaluate stage skipped, with why."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for model in ("two_tower", "ease", "most_popular"):
        figures = m.get(model)
        if not isinstance(figures, dict):
            continue
        line = ", ".join(f"{k}={v:.4f}" for k, v in figures.items() if isinstance(v, (int, float)))
        typer.echo(f"          {model:<12} " + (line or f"skipped: {figures.get('skipped', 'no figures')}"))


def _print_gate_warnings(path: Path, ran: bool) -> None:
    """The gate's warnings of this run (a baseline ahead of the two-tower, a drop within the holdout's
    noise), which the stage's own output printed among many lines: a run that passed with them
    should not read as a clean one."""
    try:
        warnings = json.loads(path.read_text()).get("warnings") if ran else None
    except (OSError, ValueError, AttributeError):
        return
    for warning in warnings or []:
        typer.echo(f"warning:  {warning} ({path.name})")



def _print_events(ingested: Path) -> None:
    """What ingest did with the serving API's logged events (schema.json "events"), when it read any."""
    try:
        events = json.loads((ingested / "schema.json").read_text()).get("events")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(events, dict):
        quarantined = events.get("quarantined", 0)
        where = f" ({ingested / 'events_quarantine.jsonl'}: the reasons)" if quarantined else ""
        # dropped by rule (flows/sources/events_log.py), not errors: said, so a user who pushed N
        # events is not left to wonder where the rest went
        rules = (("duplicates", "exact duplicates (a retried push, or already in the source)"),
                 ("unknown", "of a user or item the source does not have"))
        dropped = [f"{events[key]} {what}" for key, what in rules if events.get(key)]
        typer.echo(f"events:   {events.get('added', 0)} real-time events added to the interactions, "
                   f"{quarantined} quarantined{where}" + (f"; dropped: {', '.join(dropped)}" if dropped else ""))


@app.command()
def params(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption) -> None:
    """Print the validated config (after --set overrides)."""
    with _errors():
        typer.echo(yaml.safe_dump(_load(params_file, set_).model_dump(mode="json"), sort_keys=False))


@app.command()
def ablate(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
           seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per row: base.seed, base.seed+1, ..."),
           only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this row (repeatable)."),
           out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Default: paths.reports.")) -> None:
    """Ablation table (mean ± std over seeds) in a temporary copy: writes ablation.md and ablation.json."""
    with _errors():
        from flows.experiments.ablation import run_cli
        run_cli(params_file, set_ or [], seeds, only, out_dir)


@app.command()
def schedule(name: str = typer.Option("nightly", "--name", help="Deployment name: towerflow/<name>."),
             cron: Optional[str] = typer.Option(None, "--cron", help='Cron expression, e.g. "0 3 * * *" (UTC).'),
             interval: Optional[float] = typer.Option(None, "--interval", help="Seconds between runs."),
             until: Optional[str] = typer.Option(None, "--until", help="Scheduled runs stop after this stage."),
             set_: Optional[list[str]] = typer.Option(None, "--set", "-S", help="Override a params.yaml key in "
                                                      "this deployment's runs: key.sub=value (repeatable)."),
             params_file: Path = ParamsOption) -> None:
    """Create (or update) a Prefect deployment of the pipeline on a cron or an interval."""
    with _errors():
        _load(params_file, set_)   # a broken params.yaml or override fails now, not at 3 am
        from flows.schedule import create
        deployment_id = create(params_file.resolve().parent, name, cron, interval, _stages_until(until), set_)
        typer.echo(f"deployment towerflow/{name} ({deployment_id}): "
                   f"{'cron ' + repr(cron) if cron else f'every {interval:g} s'}"
                   f"{', with ' + ', '.join(set_) if set_ else ''}; "
                   f"run `towerflow serve --name {name}` to execute it")


@app.command()
def serve(name: Optional[list[str]] = typer.Option(None, "--name", help="A deployment created by `towerflow "
                                                   "schedule` (repeatable; default: nightly).")) -> None:
    """Serve scheduled deployments in the foreground (Ctrl-C stops it); their runs take turns."""
    with _errors():
        from flows.schedule import serve as _serve
        _serve(list(name or ["nightly"]))


@app.command()
def bench(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
          out: Path = typer.Option(Path("reports/bench.json"), "--out", help="Where the figures are written."),
          repeats: int = typer.Option(50, "--repeats", min=1, help="Timed calls per latency figure."),
          index_items: int = typer.Option(0, "--index-items", min=0, help="Also time the embedded index backends "
                                          "on a synthetic catalog of this many 64-d items (1000000: ~18 min on 2 cores)."),
          scale: Optional[int] = typer.Option(None, "--scale", min=1000, help="Instead: the whole pipeline on this many "
                                              "generated interactions (string ids, Zipf items, ranking logs), each "
                                              "stage's seconds, peak RSS and rows/s merged into --out "
                                              "(default reports/bench_scale.json)."),
          users: Optional[int] = typer.Option(None, "--users", min=1, help="With --scale: users (default N/10)."),
          items: Optional[int] = typer.Option(None, "--items", min=1, help="With --scale: items (default N/50)."),
          log_requests: float = typer.Option(0.02, "--log-requests", min=0.0, max=1.0,
                                             help="With --scale: logged ranking requests per interaction, 50 "
                                             "log rows each (0.4: the demo simulator's ~20 rows per interaction)."),
          until: Optional[str] = typer.Option(None, "--until", help="With --scale: stop after this stage."),
          keep: Optional[Path] = typer.Option(None, "--keep", help="With --scale: build the project copy, the "
                                              "generated source and the stage logs in this new folder and keep "
                                              "them (default: a temporary folder, removed)."),
          resume: Optional[Path] = typer.Option(None, "--resume", help="Go on with a bench kept by --keep: the "
                                                "stages after the last one that passed (up to --until), into "
                                                "the same row of the --out it began with (unless given another); "
                                                "--set adds to its settings (e.g. train.epochs).")) -> None:
    """Time every stage on the demo, training throughput and recommendation latency (a temporary copy)."""
    with _errors():
        if resume is not None and (scale is not None or keep is not None):
            raise TowerflowError("--resume goes on with a kept bench of its own size: give it without --scale "
                                 "and --keep")
        if scale is not None or resume is not None:
            from flows.experiments.scale_bench import DEFAULT_OUT, resume_out, scale_bench
            target = out
            if out == Path("reports/bench.json"):    # no --out: where the kept bench wrote, else the default
                target = (resume_out(resume) if resume is not None else None) or DEFAULT_OUT
            stages = _stages_until(until)     # an unknown stage name fails before anything runs
            try:
                row = scale_bench(params_file.resolve().parent, target, scale or 0, set_ or [], users, items,
                                  stages=stages, log=typer.echo, keep=keep, resume=resume, until=until,
                                  log_requests=log_requests)
            except ValueError as exc:    # a shape that cannot be generated (more users than interactions)
                raise TowerflowError(str(exc)) from exc
            from flows.experiments.scale_bench import markdown_table
            typer.echo(markdown_table(json.loads(target.read_text())))
            typer.echo(f"total {row['total_seconds']}s, peak RSS {row['peak_rss_mb']} MB, "
                       f"completed={row['completed']}; written to {target}")
            return
        from flows.experiments.bench import bench as _bench
        result = _bench(params_file.resolve().parent, out, set_ or [], repeats, index_items)
        typer.echo(json.dumps({k: result[k] for k in ("stage_seconds", "total_seconds", "train_throughput", "recommend",
                                                  "features", "index")},
                              indent=2))
        typer.echo(f"written to {out}")


@app.command("gate-bench")
def gate_bench(params_file: Path = ParamsOption,
               shapes: str = typer.Option("trend,halfstar,weekly", "--shapes",
                                          help="Data shapes of flows/sources/shapes.py, comma-separated."),
               variants: str = typer.Option("healthy,one_epoch,shuffled,ratings_x10,duplicated", "--variants",
                                            help="Second runs after a first one published (comma-separated)."),
               out: Path = typer.Option(Path("reports/gate_shapes.json"), "--out",
                                        help="Where the verdicts are written.")) -> None:
    """The whole pipeline with default params on data shaped unlike the demo, twice: does the gate pass
    the healthy second run and stop each broken one? (~5 min per run on 2 cores)"""
    with _errors():
        from flows.experiments.gate_shapes import gate_bench as _gate_bench
        _gate_bench(params_file.resolve().parent, out, shapes.split(","), variants.split(","), log=typer.echo)
        typer.echo(f"written to {out}")


@app.command("incremental-bench")
def incremental_bench(
        set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
        data: Optional[Path] = typer.Option(None, "--data", help="Folder with training/ and ingested/schema.json "
                                            "(default: the project's paths.training and paths.ingested parent)."),
        out: Path = typer.Option(Path("reports"), "--out", help="Folder for incremental.json and incremental.md."),
        epochs: int = typer.Option(10, "--epochs", min=1, help="Epochs of each full training."),
        finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", min=1,
                                                      help="Default: train.finetune_epochs."),
        replay: Optional[float] = typer.Option(None, "--replay", min=0, max=1, help="Default: train.finetune_replay."),
        increments: int = typer.Option(4, "--increments", min=2, help="Slices after the base (the last: holdout only)."),
        seeds: int = typer.Option(3, "--seeds", min=1, help="Runs with seeds 0..n-1 (mean ± std).")) -> None:
    """Full retrain vs fine-tune on the demo's materialized examples split by time (docs/INCREMENTAL.md)."""
    with _errors():
        from flows.experiments.incremental import BenchConfig, run_seeds, write
        params = _load(params_file, set_)
        paths = params.paths.resolved(params_file.resolve().parent)
        if data is None:
            if paths.training.parent != paths.ingested.parent:
                raise TowerflowError("paths.training and paths.ingested are in different folders: pass --data")
            data = paths.training.parent
        if not (data / "training" / "examples.parquet").exists():
            raise MissingStageInput(f"{data / 'training' / 'examples.parquet'}: not found; run the materialize stage "
                                    "first (`towerflow run --until materialize`)")
        bench = BenchConfig(increments=increments, epochs=epochs, seed=0,
                            finetune_epochs=finetune_epochs or params.train.finetune_epochs,
                            replay=params.train.finetune_replay if replay is None else replay)
        result = run_seeds(data, params.model, params.train, bench, list(range(seeds)), log=typer.echo)
        write(result, out)
        typer.echo(f"written to {out / 'incremental.md'} and {out / 'incremental.json'}")


report_app = typer.Typer(no_args_is_help=True, help="The run's report portal (reports/index.html).")
app.add_typer(report_app, name="report")


@report_app.command("build")
def report_build(params_file: Path = ParamsOption) -> None:
    """(Re)build the report portal from the current outputs (`towerflow run` does it after every run)."""
    with _errors():
        from flows.portal.run import build_run_portal
        root = params_file.resolve().parent
        typer.echo(str(build_run_portal(_load(params_file, None), root)))


@report_app.command("open")
def report_open(browser: bool = typer.Option(False, "--browser", help="Also open it in the default browser."),
                params_file: Path = ParamsOption) -> None:
    """Print the path of the report portal: one offline page linking every report of the last run."""
    with _errors():
        params = _load(params_file, None)
        portal = params.paths.resolved(params_file.resolve().parent).reports / "index.html"
        if not portal.is_file():
            raise MissingStageInput(f"{portal} not found: run `towerflow run` (or `towerflow report build`)")
        typer.echo(str(portal))
        if browser:
            import webbrowser  # stdlib, but it probes for browsers: only when asked
            if not webbrowser.open(portal.as_uri()):
                typer.echo("towerflow: no browser found; open the path above", err=True)

