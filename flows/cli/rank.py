"""The rank stage's commands: score pairs, the measurement table, the hard-negatives experiment."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.errors import MissingStageInput

from flows.cli.common import ParamsOption, SetOption, _errors, _load, app


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
        from flows.serving.rerank import load_reranker, read_pairs, score_pairs, unknown_pairs
        table = read_pairs(pairs, json.loads(schema_path.read_text()))
        ranker = load_reranker(paths.ranker)
        scores = score_pairs(table, ranker)
        out.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(out, index=False)
        typer.echo(f"wrote {len(scores)} scores to {out}")
        users, items = unknown_pairs(table, ranker)
        if users or items:
            typer.echo(f"note: {users} pair(s) with a user and {items} with an item the ranker was not "
                       f"trained on: scored as cold-start (its unknown-id row)", err=True)


@rank_app.command("table")
def rank_table(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
               seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per cell: base.seed, base.seed+1, ..."),
               requests: float = typer.Option(0.05, "--request-fraction", help="simulator.request_fraction of each regenerated log."),
               out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Default: paths.reports."),
               etas: Optional[list[float]] = typer.Option(None, "--eta", help="Only these η (repeatable)."),
               strengths: Optional[list[float]] = typer.Option(None, "--logger", help="Only these logging strengths."),
               redraws: Optional[list[float]] = typer.Option(None, "--redraw", help="Only these logger_error_redraw (0 persistent, 1 redrawn)."),
               rows: Optional[list[str]] = typer.Option(None, "--row", help="Only these rows (naive, pal, ...)."),
               neighbour: bool = typer.Option(True, "--neighbour/--no-neighbour", help="The neighbour-effect set.")) -> None:
    """The rankers measured against the simulator's truth across bias strengths and loggers (slow)."""
    with _errors():
        from flows.experiments import rank_table as rt
        subset = {k: tuple(v) for k, v in (("etas", etas), ("strengths", strengths), ("redraws", redraws)) if v}
        subset |= {"rows": list(rows)} if rows else {}
        subset |= {} if neighbour else {"neighbour": False}
        rt.run_cli(params_file, set_ or [], seeds, requests, out_dir, subset or None)


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



@rank_app.command("ltr-bench")
def rank_ltr_bench(set_: Optional[list[str]] = SetOption, params_file: Path = ParamsOption,
                   seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds: base.seed, base.seed+1, ..."),
                   queries: int = typer.Option(600, "--queries", min=10, help="Queries of the generated world."),
                   sessions: int = typer.Option(10, "--sessions", min=1, help="Logged sessions per logged query."),
                   diagnostics: bool = typer.Option(False, "--diagnostics", help="Also PAL with the true examination curve and the naive network on the true labels."),
                   logger: str = typer.Option("both", "--logger", help="random | confounding | both: the logging rankers to simulate."),
                   out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Default: paths.reports.")) -> None:
    """The rankers on an LTR-shaped world (graded labels, numeric documents, held-out queries; slow)."""
    with _errors():
        from flows.experiments.ltr_bench import loggers_named, ltr_bench
        from flows.experiments.ltr_data import LtrShape
        params = _load(params_file, set_)
        loggers = loggers_named(logger)
        out = out_dir or params.paths.resolved(params_file.resolve().parent).reports
        ltr_bench(params.rank, LtrShape(queries=queries, sessions=sessions),
                  [params.base.seed + i for i in range(seeds)], out, loggers=loggers, diagnostics=diagnostics)
        typer.echo(f"written {out / 'rank_ltr.md'} and {out / 'rank_ltr.json'}")
