"""The `towerflow` command line. Kept light: heavy libraries are imported inside the commands."""
from __future__ import annotations

import getpass
import json
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
import yaml

from flows.environment import configure_environment
from flows.errors import EXPECTED_ERRORS, TRANSIENT_EXIT, MissingStageInput, TowerflowError, TransientError
from flows.params import load_params, resolve_source
from flows.stages.registry import STAGES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="towerflow: train two-tower retrieval models and ship them.")

SetOption = typer.Option(None, "--set", "-S", help="Override a params.yaml key for this run: key.sub=value (repeatable).")
ParamsOption = typer.Option(Path("params.yaml"), "--params", help="The params file; its folder is the project root.")


def _debug() -> bool:
    return os.environ.get("TOWERFLOW_DEBUG", "") not in ("", "0")


@contextmanager
def _errors() -> Iterator[None]:
    """Expected failures print one line and exit 1; --debug shows the traceback."""
    try:
        yield
    except (TransientError, ConnectionError, TimeoutError) as exc:
        # exit 75 (EX_TEMPFAIL): the flow retries the stage with backoff (flows/pipeline.py)
        if _debug():
            traceback.print_exc()
        typer.echo(f"towerflow: transient error (a retry may pass): {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(TRANSIENT_EXIT) from None
    except EXPECTED_ERRORS as exc:
        if _debug():
            traceback.print_exc()
        typer.echo(f"towerflow: error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug, or a library failing: still one line unless --debug
        if _debug():
            traceback.print_exc()
        typer.echo(f"towerflow: unexpected error: {type(exc).__name__}: {exc} "
                   "(run with --debug for the traceback)", err=True)
        raise typer.Exit(1) from None


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    if debug:
        os.environ["TOWERFLOW_DEBUG"] = "1"  # inherited by the stage processes DVC starts


def _load(params_file: Path, overrides: Optional[list[str]]):  # noqa: ANN202
    return load_params(params_file, overrides or [])


@app.command()
def stage(name: str = typer.Argument(..., help="One of: " + ", ".join(STAGES)),
          set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption) -> None:
    """Run one stage in this process (dvc.yaml calls this)."""
    with _errors():
        if name not in STAGES:
            raise TowerflowError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
        params = _load(params_file, set_)
        root = params_file.resolve().parent
        if name == "ingest":
            from flows.stages.ingest import check_source  # pyarrow: only when a run starts
            check_source(resolve_source(params.data, root))
        from flows.stages.registry import run_stage
        t0 = time.perf_counter()
        summary = run_stage(name, params, root)
        typer.echo(f"{name}: done in {time.perf_counter() - t0:.1f}s {_brief(summary)}")


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
    live = root / paths.published / "LIVE"
    served = json.loads(live.read_text()).get("version") if live.is_file() else "nothing published yet"
    typer.echo(f"live:     {served} ({paths.published}; `towerflow index list`)")
    typer.echo(f"metrics:  {paths.reports / 'metrics.json'}")
    typer.echo(f"review:   {paths.reports / 'index.html'} (one offline page: data checks, quality, drift, "
               f"gate, curves, what was published)")
    if any(r.ran for r in runs):
        typer.echo("dvc.lock records this run: `git add dvc.lock && git commit` to version it")
    metrics = root / paths.reports / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        for model in ("two_tower", "ease", "most_popular"):
            if model in m:
                typer.echo(f"          {model:<12} " + ", ".join(
                    f"{k}={v:.4f}" for k, v in m[model].items() if isinstance(v, (int, float))))


@app.command()
def recommend(user_id: Optional[str] = typer.Option(None, "--user-id", help="One user id."),
              users_file: Optional[Path] = typer.Option(None, "--users-file", help="Text file, one user id per line (optional header 'user_id')."),
              k: int = typer.Option(20, "--k", min=1, help="How many items per user."),
              out: Optional[Path] = typer.Option(None, "--out", help="Write user_id,item_id,rank,score,cold_start CSV here."),
              include_seen: bool = typer.Option(False, "--include-seen", help="Keep items the user already interacted with."),
              filter_: Optional[str] = typer.Option(None, "--filter", help='Only items whose fields match, as JSON: \'{"genres": "Comedy", "year": {"gte": 1990}}\'.'),
              rerank: bool = typer.Option(False, "--rerank", help="Re-rank the retrieved items with the rank stage's relevance tower."),
              rerank_depth: int = typer.Option(100, "--rerank-depth", min=1, help="With --rerank: how many retrieved items to re-rank."),
              params_file: Path = ParamsOption) -> None:
    """Recommend items from the live published bundle, with Feast online features and its user tower."""
    with _errors():
        if (user_id is None) == (users_file is None):
            raise TowerflowError("give exactly one of --user-id or --users-file")
        params = _load(params_file, None)
        paths = params.paths.resolved(params_file.resolve().parent)
        from flows.serving.bundles import BundleStore
        bundle = BundleStore(paths.published).live_dir()   # nothing published: says to run the pipeline
        id_dtype = json.loads((bundle / "schema.json").read_text())["user_id_dtype"]
        from flows.serving.recommend import Recommender, parse_filter_json, parse_id, read_ids_file
        if users_file is not None:
            ids = read_ids_file(users_file, id_dtype)
        else:
            ids = [parse_id(user_id.strip(), id_dtype, "--user-id")]
        query_filter = parse_filter_json(filter_)
        ranker = None
        if rerank:  # loaded first: a missing ranker fails before the index is queried
            from flows.serving.rerank import load_reranker
            ranker = load_reranker(paths.ranker)
        with Recommender.load(bundle, paths.feast, paths.features) as recommender:
            recs = recommender.recommend(ids, max(k, rerank_depth) if rerank else k,
                                         exclude_seen=not include_seen, filter=query_filter)
        if ranker is not None:
            from flows.serving.rerank import rerank as _rerank
            recs = _rerank(recs, ranker, k)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            recs.to_csv(out, index=False)
            typer.echo(f"wrote {len(recs)} rows for {recs['user_id'].nunique()} users to {out}")
        else:
            typer.echo(recs.to_csv(index=False), nl=False)


index_app = typer.Typer(no_args_is_help=True, help="Published bundles: list them, roll back.")
app.add_typer(index_app, name="index")


def _bundle_store(params_file: Path):  # noqa: ANN202
    from flows.serving.bundles import BundleStore
    params = _load(params_file, None)
    return BundleStore(params.paths.resolved(params_file.resolve().parent).published)


@index_app.command("list")
def index_list(params_file: Path = ParamsOption) -> None:
    """Published versions, oldest first; * marks the live one."""
    with _errors():
        from flows.serving.bundles import list_versions
        store = _bundle_store(params_file)
        rows = list_versions(store)
        if not rows:
            typer.echo(f"nothing published in {store.root}")
            return
        typer.echo(f"  {'version':<26} {'items':>9}  {'model':<16}  {'backend':<13}  created")
        for r in rows:
            typer.echo(f"{'*' if r['live'] else ' '} {r['version']:<26} {r['count']:>9}  {r['model_digest']:<16}  "
                       f"{r['backend']:<13}  {r['created_at']}")


@index_app.command("rollback")
def index_rollback(to: Optional[str] = typer.Option(None, "--to", help="Version to make live (default: the one live before the live one)."),
                   reason: str = typer.Option("", "--reason", help="Recorded in history.jsonl."),
                   params_file: Path = ParamsOption) -> None:
    """Make an earlier published version live (model, vectors and index together)."""
    with _errors():
        from flows.serving.bundles import rollback
        old, new = rollback(_bundle_store(params_file), to, reason)
        typer.echo(f"live: {new} (was {old})")


rank_app = typer.Typer(no_args_is_help=True, help="The rank stage's models: score pairs, the measurement table.")
app.add_typer(rank_app, name="rank")


@rank_app.command("score")
def rank_score(pairs: Path = typer.Option(..., "--pairs", help="CSV with header user_id,item_id."),
               out: Path = typer.Option(..., "--out", help="Write user_id,item_id,score CSV here."),
               params_file: Path = ParamsOption) -> None:
    """Score user/item pairs with the rank stage's relevance tower (no position)."""
    with _errors():
        paths = _load(params_file, None).paths.resolved(params_file.resolve().parent)
        schema_path = paths.ingested / "schema.json"
        if not schema_path.exists():
            raise MissingStageInput(f"{schema_path} not found: run `towerflow run` first")
        from flows.serving.rerank import load_reranker, read_pairs, score_pairs
        table = read_pairs(pairs, json.loads(schema_path.read_text()))
        scores = score_pairs(table, load_reranker(paths.ranker))
        out.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(out, index=False)
        typer.echo(f"wrote {len(scores)} scores to {out}")


@rank_app.command("table")
def rank_table(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
               seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per cell: base.seed, base.seed+1, ..."),
               requests: float = typer.Option(0.05, "--request-fraction", help="simulator.request_fraction of each regenerated log."),
               out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Default: paths.reports.")) -> None:
    """The rankers measured against the simulator's truth across bias strengths and loggers (slow)."""
    with _errors():
        from flows.experiments.rank_table import run_cli
        run_cli(params_file, set_ or [], seeds, requests, out_dir)


@rank_app.command("negatives")
def rank_negatives(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
                   seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per row: base.seed, base.seed+1, ..."),
                   out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Default: paths.reports.")) -> None:
    """Retrieval with the debiased ranker's hard negatives vs the logs' (sample, train, evaluate; slow)."""
    with _errors():
        from flows.experiments.ranker_negatives import ranker_negatives
        from flows.params import read_raw
        root = params_file.resolve().parent
        params = _load(params_file, set_)
        out = out_dir or params.paths.resolved(root).reports
        ranker_negatives(read_raw(params_file), root, out, [params.base.seed + i for i in range(seeds)], set_ or [])
        typer.echo(f"written {out / 'ranker_negatives.md'} and {out / 'ranker_negatives.json'}")


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
             params_file: Path = ParamsOption) -> None:
    """Create (or update) a Prefect deployment of the pipeline on a cron or an interval."""
    with _errors():
        _load(params_file, None)   # a broken params.yaml fails now, not at 3 am
        from flows.schedule import create
        deployment_id = create(params_file.resolve().parent, name, cron, interval, _stages_until(until))
        typer.echo(f"deployment towerflow/{name} ({deployment_id}): "
                   f"{'cron ' + repr(cron) if cron else f'every {interval:g} s'}; "
                   f"run `towerflow serve --name {name}` to execute it")


@app.command()
def serve(name: str = typer.Option("nightly", "--name", help="The deployment created by `towerflow schedule`.")) -> None:
    """Serve a scheduled deployment in the foreground (Ctrl-C stops it)."""
    with _errors():
        from flows.schedule import serve as _serve
        _serve(name)


@app.command()
def bench(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
          out: Path = typer.Option(Path("reports/bench.json"), "--out", help="Where the figures are written."),
          repeats: int = typer.Option(50, "--repeats", min=1, help="Timed calls per latency figure.")) -> None:
    """Time every stage on the demo, training throughput and recommendation latency (a temporary copy)."""
    with _errors():
        from flows.experiments.bench import bench as _bench
        result = _bench(params_file.resolve().parent, out, set_ or [], repeats)
        typer.echo(json.dumps({k: result[k] for k in ("stage_seconds", "total_seconds", "recommend", "features")},
                              indent=2))
        typer.echo(f"written to {out}")


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


def main() -> None:
    configure_environment(Path.cwd())
    app()


if __name__ == "__main__":
    main()
