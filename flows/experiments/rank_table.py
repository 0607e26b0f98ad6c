"""`towerflow rank table`: the rankers measured against the simulator's truth (issue 16's table).

On the project's ingested interactions, the flows simulator regenerates the ranking logs for every
position-bias strength η ∈ {0.5, 1, 2} × logging strength ∈ {0, 0.5, 1} (what the logging ranker knew
about true relevance: 0 random, 1 perfect) × the logger's error persistent (it repeats its mistakes,
as a trained ranker does: the confounded case) or redrawn per request × every seed; each row (each model of the rank stage,
the disentangling variants of Zhang et al. 2023, LightGBM lambdarank with its position field) is
fitted and measured exactly as the rank stage does (flows/stages/rank.py): NDCG@10 of its relevance
ordering against true relevance, propensity recovery (Pearson, MAE), click log-likelihood, all on
held-out requests. A second, smaller set turns the neighbour effect on (γ, in a list and in a grid)
for the models it concerns. Requests are subsampled (`request_fraction`) to keep the run time in
check. Writes <out_dir>/ranking_table.{json,md}; everything else lives in a temporary folder.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from flows.errors import ConfigError
from flows.params import Params, SimulatorParams, apply_overrides, read_raw, validate_params
from models.ranking.params import RankParams

ETAS = (0.5, 1.0, 2.0)
STRENGTHS = (0.0, 0.5, 1.0)
REDRAWS = (0.0, 1.0)                  # simulator.logger_error_redraw: persistent errors, redrawn ones
GAMMA, GRID_COLUMNS = 0.5, 5          # the neighbour-effect set: γ, and the grid's width
# row name → (model kind, rank-section overrides)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "naive": ("naive", {}), "pal": ("pal", {}), "additive": ("additive", {}), "dot": ("dot", {}),
    "bilinear": ("bilinear", {}), "mixture": ("mixture", {}), "xpa": ("xpa", {}),
    "dla": ("dla", {}),
    "pal + observation dropout": ("pal", {"observation_dropout": 0.3}),
    "pal + gradient reversal": ("pal", {"grad_reversal": 1.0}),
    "additive + observation dropout": ("additive", {"observation_dropout": 0.3}),
    "additive + gradient reversal": ("additive", {"grad_reversal": 1.0}),
}
NEIGHBOUR_ROWS = ("pal", "additive", "xpa")
LIGHTGBM = "lightgbm (lambdarank + position)"
LOGGED = "logging ranker's own order"        # reference: how much the logger knew
METRICS = ("ndcg@10", "pearson", "mae", "click_loglik")


@dataclass(frozen=True)
class Cell:
    """One simulated world: bias strength, logger strength, neighbour effect and layout, seed."""
    eta: float
    strength: float
    seed: int
    gamma: float = 0.0
    grid: int | None = None
    redraw: float = 0.0               # share of the logger's error redrawn per request (0: persistent)

    @property
    def setting(self) -> str:
        base = f"η={self.eta:g}, logger={self.strength:g}"
        if self.redraw:
            base += ", errors redrawn" if self.redraw == 1 else f", errors {self.redraw:g} redrawn"
        if self.gamma:
            base += f", γ={self.gamma:g} " + (f"grid {self.grid} wide" if self.grid else "list")
        return base

    def simulator(self, sim: SimulatorParams, request_fraction: float) -> SimulatorParams:
        return sim.model_copy(update={"position_bias": self.eta, "logging_strength": self.strength,
                                      "neighbour_effect": self.gamma, "grid_columns": self.grid,
                                      "logger_error_redraw": self.redraw, "request_fraction": request_fraction})


def _metrics(row: dict[str, Any]) -> dict[str, float | None]:
    prop = row.get("propensity") or {}
    return {"ndcg@10": row["ndcg@10"], "pearson": prop.get("pearson"), "mae": prop.get("mae"),
            "click_loglik": row.get("click_loglik")}


def run_cell(cell: Cell, params: Params, rows: list[str], request_fraction: float, ingested: Path,
             vectors: Any, work: Path) -> tuple[dict[str, dict[str, float | None]], int]:
    """Simulate one log and measure every row on it: ({row: metrics}, held-out requests)."""
    from flows.sources.simulator import simulate
    from flows.stages.rank import clean, item_table, lightgbm_row, rank_data, fit_and_measure

    inter = pq.read_table(ingested / "interactions.parquet")
    catalog = pq.read_table(ingested / "items.parquet", columns=["item_id"])["item_id"]
    logs, truth = work / "ranking_logs.parquet", work / "simulation"
    simulate(inter, catalog, cell.simulator(params.simulator, request_fraction), cell.seed, logs, truth)
    schema = json.loads((ingested / "schema.json").read_text())
    data = rank_data(params.rank, logs, truth, item_table(ingested, schema), vectors, work)
    if data is None:
        raise RuntimeError(f"{cell.setting}: the simulator showed nothing (request_fraction too small?)")
    from models.ranking.evaluate import logged_ndcg

    out: dict[str, dict[str, float | None]] = {LOGGED: {"ndcg@10": logged_ndcg(data.log(params.rank, "test"))}}
    for name in rows:
        if name == LIGHTGBM:
            out[name] = {"ndcg@10": lightgbm_row(params.rank, cell.seed, data)["ndcg@10"]}
            continue
        kind, overrides = ROWS[name]
        cfg = RankParams.model_validate(params.rank.model_dump() | overrides | {"models": [kind], "serve": kind})
        _, row = fit_and_measure(kind, cfg, cell.seed, data)
        out[name] = clean(_metrics(row))
    return out, sum(len(b.user) for b in data.log(params.rank, "test"))


def _summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{setting: {row: {metric: {"mean", "std", "n"}}}} over the seeds of each setting."""
    grouped: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for row, metrics in run["rows"].items():
            cell = grouped.setdefault(run["setting"], {}).setdefault(row, {})
            for m, v in metrics.items():
                if v is not None:
                    cell.setdefault(m, []).append(v)
    return {s: {r: {m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "n": len(v)} for m, v in ms.items()} for r, ms in rows.items()}
            for s, rows in grouped.items()}


def _fmt(cell: dict[str, Any] | None, digits: int) -> str:
    return "–" if not cell else f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def _section(summary: dict[str, Any], settings: list[str], rows: list[str], metric: str, title: str,
             digits: int = 3, table: dict[str, Any] | None = None) -> list[str]:
    table = summary["table"] if table is None else table
    rows = [r for r in rows if any(table.get(s, {}).get(r, {}).get(metric) for s in settings)]
    if not settings or not rows:
        return []
    lines = [f"### {title}", "", "| row | " + " | ".join(settings) + " |",
             "|---|" + "---|" * len(settings)]
    for row in rows:
        cells = [_fmt(table.get(s, {}).get(row, {}).get(metric), digits) for s in settings]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def gains(summary: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """NDCG@10 minus naive's on the same log (paired by seed: the log's own difficulty cancels),
    summarized like the table: {setting: {row: {"ndcg@10": {"mean", "std", "n"}}}}."""
    paired = [{"setting": run["setting"], "rows": {
        row: {"ndcg@10": m["ndcg@10"] - run["rows"]["naive"]["ndcg@10"]}
        for row, m in run["rows"].items() if row not in ("naive", LOGGED) and m.get("ndcg@10") is not None}}
        for run in summary["runs"] if (run["rows"].get("naive") or {}).get("ndcg@10") is not None]
    return _summarize(paired)


def _columns(summary: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """The measured settings, in the order they ran: persistent-error worlds, redrawn-error worlds, and
    the neighbour-effect set (with its γ = 0 reference). A partial table has no empty columns."""
    seen: dict[str, dict[str, Any]] = {}
    for run in summary["runs"]:
        seen.setdefault(run["setting"], run.get("cell", {}))
    main = [s for s, c in seen.items() if not c.get("gamma") and not c.get("redraw")]
    redrawn = [s for s, c in seen.items() if not c.get("gamma") and c.get("redraw")]
    near = [s for s, c in seen.items() if c.get("gamma")]
    base = Cell(1.0, 0.0, 0).setting
    return main, redrawn, ([base] if near and base in seen else []) + near


def markdown(summary: dict[str, Any]) -> str:
    main, redrawn, neighbour = _columns(summary)
    measured = {row for setting in summary.get("table", {}).values() for row in setting}
    rows = [r for r in (*ROWS, LIGHTGBM, LOGGED) if r in measured]
    head = [f"## Ranking table: {len(summary['seeds'])} seeds ({', '.join(map(str, summary['seeds']))}), "
            "mean ± std", "",
            f"Logs regenerated by the flows simulator on the ingested interactions at request_fraction "
            f"{summary['request_fraction']} ({summary['test_requests']} held-out requests per log on "
            f"average); relevance features: {summary['features']}. Unless a column says \"errors redrawn\", "
            "the logging ranker's error is persistent (simulator.logger_error_redraw 0). Run time "
            f"{summary['seconds'] / 60:.1f} min on 2 shared cores.", ""]
    near_rows = [r for r in (*NEIGHBOUR_ROWS, LOGGED) if r in measured]
    parts = [
        _section(summary, main, rows, "ndcg@10", "NDCG@10 of the relevance ordering vs true relevance"),
        _section(summary, main + redrawn, [r for r in rows if r not in ("naive", LOGGED)], "ndcg@10",
                 "NDCG@10 gain over naive on the same log (paired by seed)", table=gains(summary)),
        _section(summary, redrawn, rows, "ndcg@10",
                 "NDCG@10 with the logger's error redrawn per request (no confounding: the old world)"),
        _section(summary, main, [r for r in rows if r not in ("naive", LIGHTGBM, LOGGED)], "pearson",
                 "Propensity recovery: Pearson correlation with the true examination curve "
                 "(mixture: mean over user types of the best component)"),
        _section(summary, main, [r for r in rows if r not in ("naive", LIGHTGBM, LOGGED)], "mae",
                 "Propensity recovery: mean absolute error (curves relative to position 1)"),
        _section(summary, main, [r for r in rows if r not in ("mixture", LIGHTGBM, LOGGED)], "click_loglik",
                 "Click log-likelihood per held-out impression", digits=4),
        _section(summary, neighbour, near_rows, "ndcg@10", "Neighbour effect: NDCG@10"),
        _section(summary, neighbour, [r for r in near_rows if r != LOGGED], "click_loglik",
                 "Neighbour effect: click log-likelihood", digits=4),
    ]
    return "\n".join(head + [line for part in parts for line in part])


def cells(seeds: list[int], etas: tuple[float, ...] = ETAS, strengths: tuple[float, ...] = STRENGTHS,
          redraws: tuple[float, ...] = REDRAWS, rows: list[str] | None = None,
          neighbour: bool = True) -> list[tuple[Cell, list[str]]]:
    """Every world with the rows measured in it (or the subset named: `towerflow rank table --eta ...`)."""
    main_rows = rows or [*ROWS, LIGHTGBM]
    main = [(Cell(e, s, seed, redraw=r), main_rows) for r in redraws for e in etas for s in strengths
            for seed in seeds]
    near = [(Cell(1.0, 0.0, seed, GAMMA, g), [r for r in NEIGHBOUR_ROWS if rows is None or r in rows])
            for g in (None, GRID_COLUMNS) for seed in seeds]
    return main + (near if neighbour else [])


def rank_table(params: Params, root: Path, out_dir: Path, seeds: list[int], request_fraction: float,
               log: Callable[[str], None] = print, only: list[tuple[Cell, list[str]]] | None = None) -> dict:
    """Run every cell (or `only` these); write out_dir/ranking_table.{json,md} after each one."""
    from flows.stages.rank import retrieval_vectors

    import torch
    torch.set_num_threads(params.rank.threads)
    paths = params.paths.resolved(root)
    model_dir = paths.model / "full"
    vectors = (retrieval_vectors(model_dir, paths.ingested)
               if params.rank.retrieval_embeddings and (model_dir / "model.pt").exists() else None)
    summary: dict[str, Any] = {
        "seeds": seeds, "request_fraction": request_fraction, "runs": [], "test_requests": 0,
        "features": "ids, numeric item features" + (" and the retrieval embeddings" if vectors else ""),
        "rank": params.rank.model_dump(mode="json"), "seconds": 0.0}
    started = time.perf_counter()
    for cell, rows in (cells(seeds) if only is None else only):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="towerflow-rank-table-") as tmp:
            result, test = run_cell(cell, params, rows, request_fraction, paths.ingested, vectors, Path(tmp))
        summary["runs"].append({"setting": cell.setting, "seed": cell.seed, "rows": result,
                                "cell": {k: v for k, v in asdict(cell).items() if k != "seed"},
                                "test_requests": test, "seconds": round(time.perf_counter() - t0, 1)})
        summary["test_requests"] = round(statistics.fmean(r["test_requests"] for r in summary["runs"]))
        log(f"{cell.setting}, seed {cell.seed}: {time.perf_counter() - t0:.0f}s  " + ", ".join(
            f"{r}={m['ndcg@10']:.3f}" for r, m in result.items()))
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["table"] = _summarize(summary["runs"])
        _write(summary, out_dir)
    return summary


def _write(summary: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ranking_table.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "ranking_table.md").write_text(markdown(summary))


def run_cli(params_file: Path, overrides: list[str], n_seeds: int, request_fraction: float,
            out_dir: Path | None, subset: dict[str, Any] | None = None) -> dict:
    """`towerflow rank table`: seeds base.seed, base.seed+1, ...; writes to out_dir (default paths.reports).
    `subset`: keyword arguments of `cells` (etas, strengths, redraws, rows, neighbour) for a smaller table."""
    root = params_file.resolve().parent
    params = validate_params(apply_overrides(read_raw(params_file), overrides),
                             origin=f"{params_file} with --set overrides")
    seeds = [params.base.seed + i for i in range(n_seeds)]
    out = out_dir or params.paths.resolved(root).reports
    unknown = set((subset or {}).get("rows") or ()) - {*ROWS, LIGHTGBM}
    if unknown:
        raise ConfigError(f"unknown table rows {sorted(unknown)}; known: {[*ROWS, LIGHTGBM]}")
    only = cells(seeds, **subset) if subset else None
    summary = rank_table(params, root, out, seeds, request_fraction, log=lambda line: print(line, flush=True),
                         only=only)
    print(f"written {out / 'ranking_table.md'} and {out / 'ranking_table.json'}")
    return summary
