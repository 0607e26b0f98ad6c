"""The `towerflow` command line. Kept light: heavy libraries are imported inside the commands."""
from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from flows.environment import configure_environment
from flows.errors import TowerflowError
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
    except TowerflowError as exc:
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
    from flows.params import load_params
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
            from flows.params import resolve_source
            from flows.stages.ingest import check_source
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
        force: bool = typer.Option(False, "--force", help="Rerun every stage even if up to date."),
        until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage.")) -> None:
    """Run the whole pipeline as a Prefect flow over the DVC stages (skips what is up to date)."""
    with _errors():
        params = _load(params_file, set_)  # bad keys or types fail here, before anything runs
        root = params_file.resolve().parent
        from flows.params import resolve_source
        from flows.stages.ingest import check_source
        check_source(resolve_source(params.data, root))  # a broken data source stops the run before anything is written
        stages = STAGES
        if until:
            if until not in STAGES:
                raise TowerflowError(f"unknown stage '{until}' for --until; stages are: {', '.join(STAGES)}")
            stages = STAGES[: STAGES.index(until) + 1]
        from flows.pipeline import run_pipeline
        t0 = time.perf_counter()
        runs = run_pipeline(root, stages, overrides=set_ or [], force=force)
        _print_summary(runs, params, root, time.perf_counter() - t0)


def _print_summary(runs, params, root: Path, total: float) -> None:  # noqa: ANN001
    paths = params.paths
    typer.echo("\nstage        status       seconds")
    for r in runs:
        typer.echo(f"{r.stage:<12} {'ran' if r.ran else 'up to date':<12} {r.seconds:7.1f}")
    typer.echo(f"{'total':<12} {'':<12} {total:7.1f}\n")
    where = os.environ.get("QDRANT_URL") or paths.qdrant
    typer.echo(f"model:    {paths.model / 'full'} (evaluation model: {paths.model / 'eval'})")
    typer.echo(f"index:    alias '{params.publish.alias}' in Qdrant at {where} ({paths.index / 'manifest.json'})")
    typer.echo(f"metrics:  {paths.reports / 'metrics.json'}")
    typer.echo(f"reports:  {paths.reports / 'validation' / 'index.html'} (contract tables), "
               f"{paths.reports / 'training_validation' / 'index.html'} (training set), "
               f"{paths.reports / 'drift' / 'drift.html'} (drift)")
    if any(r.ran for r in runs):
        typer.echo("dvc.lock records this run: `git add dvc.lock && git commit` to version it")
    metrics = root / paths.reports / "metrics.json"
    if metrics.exists():
        import json
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
              params_file: Path = ParamsOption) -> None:
    """Recommend items from the live published bundle, with Feast online features and its user tower."""
    with _errors():
        if (user_id is None) == (users_file is None):
            raise TowerflowError("give exactly one of --user-id or --users-file")
        params = _load(params_file, None)
        paths = params.paths.resolved(params_file.resolve().parent)
        from flows.serving.bundles import BundleStore
        bundle = BundleStore(paths.published).live_dir()   # nothing published: says to run the pipeline
        import json
        id_dtype = json.loads((bundle / "schema.json").read_text())["user_id_dtype"]
        from flows.serving.recommend import Recommender, parse_filter_json, parse_id, read_ids_file
        if users_file is not None:
            ids = read_ids_file(users_file, id_dtype)
        else:
            ids = [parse_id(user_id.strip(), id_dtype, "--user-id")]
        query_filter = parse_filter_json(filter_)
        with Recommender.load(bundle, paths.feast, paths.features) as recommender:
            recs = recommender.recommend(ids, k, exclude_seen=not include_seen, filter=query_filter)
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


@index_app.command("add-items")
def index_add_items(file: Path = typer.Argument(..., help="CSV, JSON lines or parquet: item_id + item feature columns."),
                    params_file: Path = ParamsOption) -> None:
    """Add new items to the live version without retraining (encoded by its item tower)."""
    with _errors():
        params = _load(params_file, None)
        from flows.serving.items import add_items_file
        version, n, now = add_items_file(params.paths.resolved(params_file.resolve().parent).published, file)
        if now:
            typer.echo(f"added {n} items to version {version}")
        else:
            typer.echo(f"recorded {n} items for version {version}; the running service (which holds the index) "
                       f"adds them within {params.serve.reload_interval_s:g} s")


@app.command("serve-api")
def serve_api(host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
              port: int = typer.Option(8000, "--port", help="TCP port."),
              params_file: Path = ParamsOption) -> None:
    """Serve recommendations over HTTP from the live bundle (hot reload on publish/rollback)."""
    with _errors():
        params = _load(params_file, None)
        from flows.serving.api import serve
        serve(params, params_file.resolve().parent, host, port, announce=typer.echo)


events_app = typer.Typer(no_args_is_help=True, help="Real-time interactions.")
app.add_typer(events_app, name="events")


@events_app.command("push")
def events_push(file: Path = typer.Argument(..., help="CSV, JSON lines or parquet: user_id, item_id, timestamp."),
                params_file: Path = ParamsOption) -> None:
    """Record interactions durably (serve.events_dir) and push them to the online store."""
    with _errors():
        params = _load(params_file, None)
        root = params_file.resolve().parent
        paths = params.paths.resolved(root)
        events_dir = params.serve.events_dir if params.serve.events_dir.is_absolute() else root / params.serve.events_dir
        from flows.serving.events import push_events_file
        n, users, log = push_events_file(file, paths.published, paths.feast, paths.features, events_dir,
                                         params.features.history_length, params.validate.timestamp_floor,
                                         params.serve.future_tolerance_s)
        typer.echo(f"pushed {n} events of {users} users to the online store; logged to {log}")


@app.command()
def params(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption) -> None:
    """Print the validated config (after --set overrides)."""
    with _errors():
        import yaml
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
def bench(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
          out: Path = typer.Option(Path("reports/bench.json"), "--out", help="Where the figures are written."),
          repeats: int = typer.Option(50, "--repeats", min=1, help="Timed calls per latency figure.")) -> None:
    """Time every stage on the demo, training throughput and recommendation latency (a temporary copy)."""
    with _errors():
        import json

        from flows.experiments.bench import bench as _bench
        result = _bench(params_file.resolve().parent, out, set_ or [], repeats)
        typer.echo(json.dumps({k: result[k] for k in ("stage_seconds", "total_seconds", "recommend", "features")},
                              indent=2))
        typer.echo(f"written to {out}")


def main() -> None:
    configure_environment(Path.cwd())
    app()


if __name__ == "__main__":
    main()
