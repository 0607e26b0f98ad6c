"""Commands that serve what is published: recommend, index list/rollback/add-items/remove-items, serve-api,
events."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.errors import TowerflowError
from flows.serving.ids import RESULT_COLUMNS

from flows.cli.common import ParamsOption, _errors, _load, app


@app.command()
def recommend(user_id: Optional[str] = typer.Option(None, "--user-id", help="One user id."),
              users_file: Optional[Path] = typer.Option(None, "--users-file", help="Text file, one user id per line (optional header 'user_id')."),
              k: int = typer.Option(20, "--k", min=1, help="How many items per user."),
              out: Optional[Path] = typer.Option(None, "--out", help="Write user_id,item_id,rank,score,cold_start CSV here."),
              include_seen: bool = typer.Option(False, "--include-seen", help="Keep items the user already interacted with."),
              filter_: Optional[str] = typer.Option(None, "--filter", help='Only items whose fields match, as JSON: \'{"genres": "Comedy", "year": {"gte": 1990}}\'.'),
              rerank: bool = typer.Option(False, "--rerank", help="Re-rank the retrieved items with the rank stage's relevance tower."),
              rerank_depth: int = typer.Option(100, "--rerank-depth", min=1, help="With --rerank: how many retrieved items to re-rank."),
              local: bool = typer.Option(False, "--local", help="Load the bundle in this process even when a running service serves the live version."),
              params_file: Path = ParamsOption) -> None:
    """Recommend items from the live published bundle, with Feast online features and its user tower.
    A running `serve-api` of this project that serves the live version answers instead (milliseconds
    rather than the ~1 s of loading what one answer needs on the demo); the answer is the same."""
    with _errors():
        if (user_id is None) == (users_file is None):
            raise TowerflowError("give exactly one of --user-id or --users-file")
        params = _load(params_file, None)
        paths = params.paths.resolved(params_file.resolve().parent)
        from flows.serving.store import BundleStore
        store = BundleStore(paths.published)
        bundle = store.live_dir()   # nothing published: says to run the pipeline
        id_dtype = json.loads((bundle / "schema.json").read_text())["user_id_dtype"]
        from flows.serving.ids import parse_filter_json, parse_id, read_ids_file
        if users_file is not None:
            ids = read_ids_file(users_file, id_dtype)
        else:
            ids = [parse_id(user_id.strip(), id_dtype, "--user-id")]
        query_filter = parse_filter_json(filter_)
        # re-ranked answers carry the retrieval rank, which the service does not return: asked here
        if not local and not rerank:
            from flows.serving.discovery import find_service
            service = find_service(params_file.resolve().parent, paths.published, bundle.name)
            rows = None if service is None else _ask_service(service, ids, k, include_seen, query_filter,
                                                             params.serve)
            if rows is not None:
                typer.echo(f"answered by the running service at {service.url} (--local loads the bundle here)",
                           err=True)
                _write_rows(rows, out, RESULT_COLUMNS)
                return
        from flows.serving.recommend import Recommender
        ranker = None
        if rerank:  # loaded first: a missing ranker fails before the index is queried
            from flows.serving.rerank import load_bundle_ranker
            ranker = load_bundle_ranker(bundle)
        # copy_if_held: a running service holds an embedded index; search a copy of it meanwhile
        # one_shot: this process answers and exits (with --rerank, torch comes with the ranker)
        with Recommender.load(bundle, paths.feast, paths.features, copy_if_held=True,
                              one_shot=True) as recommender:
            recs = recommender.recommend(ids, max(k, rerank_depth) if rerank else k,
                                         exclude_seen=not include_seen, filter=query_filter)
        if ranker is not None:
            from flows.serving.rerank import rerank as _rerank
            recs = _rerank(recs, ranker, k)
        _write_rows(recs.itertuples(index=False, name=None), out, list(recs.columns))


def _ask_service(service, ids: list, k: int, include_seen: bool, query_filter: dict | None,  # noqa: ANN001
                 serve) -> list[tuple] | None:  # noqa: ANN001
    """The rows of `towerflow recommend` answered by a running service, in batches of its
    serve.max_batch; None when the request is beyond its limits or any batch fails (the caller
    then loads the bundle itself, which also names what is wrong with a bad request)."""
    if k > serve.max_k:
        return None
    rows: list[tuple] = []
    for start in range(0, len(ids), serve.max_batch):
        body = {"user_ids": ids[start:start + serve.max_batch], "k": k, "exclude_seen": not include_seen,
                "filter": query_filter}
        try:
            answer = service.recommend(body)
        except Exception:  # noqa: BLE001 (refused, timed out, 4xx/5xx: the local path answers or explains)
            return None
        for user in answer["results"]:
            rows.extend((user["user_id"], hit["item_id"], hit["rank"], hit["score"], user["cold_start"])
                        for hit in user["items"])
    return rows


def _write_rows(rows, out: Path | None, columns: list[str]) -> None:  # noqa: ANN001
    """The answer rows as CSV to `out` or stdout (the csv module: the answer from a service needs no
    pandas)."""
    import csv
    import io
    import sys

    rows = list(rows)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    if out is None:
        sys.stdout.write(text.getvalue())
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue())
    typer.echo(f"wrote {len(rows)} rows for {len({row[0] for row in rows})} users to {out}")


index_app = typer.Typer(no_args_is_help=True, help="Published bundles: list them, roll back.")
app.add_typer(index_app, name="index")


def _bundle_store(params_file: Path):  # noqa: ANN202
    from flows.serving.bundles import open_store
    params = _load(params_file, None)
    return open_store(params.paths.resolved(params_file.resolve().parent).published)


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


@index_app.command("prune")
def index_prune(keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Versions to keep, the live one included (default: publish.keep_versions)."),
                params_file: Path = ParamsOption) -> None:
    """Remove published versions beyond the newest --keep (never the live one) and builds left by killed runs."""
    with _errors():
        store = _bundle_store(params_file)
        with store.locked():
            cleaned = store.clean_partials()
            pruned = store.prune(keep if keep is not None else _load(params_file, None).publish.keep_versions)
        typer.echo(f"removed {len(pruned)} version(s){': ' + ', '.join(pruned) if pruned else ''}"
                   f"{f' and {len(cleaned)} leftover(s) of killed runs' if cleaned else ''}; live: {store.live()}")



@index_app.command("add-items")
def index_add_items(file: Path = typer.Argument(..., help="CSV, JSON lines or parquet: item_id + item feature columns."),
                    params_file: Path = ParamsOption) -> None:
    """Add new items to the live version without retraining (encoded by its item tower)."""
    with _errors():
        params = _load(params_file, None)
        from flows.serving.item_files import add_items_file
        version, n, now = add_items_file(params.paths.resolved(params_file.resolve().parent).published, file)
        if now:
            typer.echo(f"added {n} items to version {version}")
        else:
            typer.echo(f"recorded {n} items for version {version}; the running service (which holds the index) "
                       f"adds them within {params.serve.reload_interval_s:g} s")


@index_app.command("remove-items")
def index_remove_items(ids: list[str] = typer.Argument(..., help="Item ids to remove from the live catalog."),
                       params_file: Path = ParamsOption) -> None:
    """Remove items from the live version (a tombstone, replayed into the other kept and future
    versions, until the item is added again)."""
    with _errors():
        params = _load(params_file, None)
        from flows.serving.item_files import remove_items_ids
        version, n, now = remove_items_ids(params.paths.resolved(params_file.resolve().parent).published, ids)
        if now:
            typer.echo(f"removed {n} items from version {version}")
        else:
            typer.echo(f"recorded the removal of {n} items for version {version}; the running service (which holds "
                       f"the index) applies it within {params.serve.reload_interval_s:g} s")


@app.command("serve-api")
def serve_api(host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
              port: int = typer.Option(8000, "--port", help="TCP port."),
              workers: int = typer.Option(1, "--workers", min=1,
                                          help="Reader processes sharing the port (each with its own index copy); "
                                               "writes run in one more process."),
              params_file: Path = ParamsOption) -> None:
    """Serve recommendations over HTTP from the live bundle (hot reload on publish/rollback).
    Writes need TOWERFLOW_API_TOKEN when it is set (required for a --host other than loopback)."""
    with _errors():
        params = _load(params_file, None)
        from flows.serving.workers import serve
        serve(params, params_file.resolve().parent, host, port, workers, announce=typer.echo)


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
        from flows.params import event_rules
        n, users, log = push_events_file(file, paths.published, paths.feast, paths.features, events_dir,
                                         params.features.history_length,
                                         event_rules(params.data, params.validate, params.serve))
        typer.echo(f"pushed {n} events of {users} users to the online store; logged to {log}")

