"""`towerflow ablate`: what each modelling choice is worth, as a table with mean ± std over seeds.

Each row is a set of params overrides on top of params.yaml (e.g. `train.logq=false`). For every row and
seed the real sample → train → evaluate stages run (through the stage registry, as `towerflow stage`
does) in a temporary copy of the ingested and training data, so the workspace's DVC outputs and
dvc.lock are never touched. Rows whose params do not exist in this version are listed as skipped.
Writes <out_dir>/ablation.json and <out_dir>/ablation.md.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.errors import ConfigError, TowerflowError

if TYPE_CHECKING:
    from flows.params import Params


@dataclass(frozen=True)
class AblationRow:
    name: str
    overrides: list[str] = field(default_factory=list)
    note: str = ""


def default_rows(params: Params) -> list[AblationRow]:
    """The issue's ablation rows. Features that params.yaml leaves off (extra negatives, SSL) are switched
    on with its own values where set, else with the fallbacks below, so each pair of rows differs in one
    choice; a row whose params equal the baseline's is listed as such, not run again."""
    train = params.train.model_dump()
    negatives = train.get("negatives") or 16                  # extra negatives per example when switched on
    hard_ratio = train.get("hard_ratio") or 0.5
    ssl = train.get("ssl_weight") or 0.1                      # SSL loss weight when switched on
    with_negatives = [f"train.negatives={negatives}"]
    return [
        AblationRow("baseline", [], "params.yaml as is"),
        AblationRow("no_logq", ["train.logq=false"], "in-batch softmax without the logQ correction"),
        # keep probability min(1, sqrt(t/f) + t/f) = 1 for every item once t ≥ 1 ≥ f
        AblationRow("no_downsampling", ["sample.popular_threshold=1.0"], "every positive kept"),
        AblationRow("strong_downsampling", ["sample.popular_threshold=0.001"],
                    "popular positives kept with prob. min(1, sqrt(t/f) + t/f) at t = 0.001"),
        AblationRow("easy_negatives_only", [*with_negatives, "train.hard_ratio=0"],
                    "extra negatives from the catalog only: no hard negatives"),
        AblationRow("hard_negatives", [*with_negatives, f"train.hard_ratio={hard_ratio}"],
                    "extra negatives, part mined from ranking logs (retrieved/ranked, not shown)"),
        AblationRow("shown_unclicked_negatives",
                    [*with_negatives, f"train.hard_ratio={hard_ratio}", "sample.shown_unclicked_negatives=true"],
                    "hard negatives also from shown-but-not-clicked items"),
        AblationRow("no_ssl", ["train.ssl_weight=0"], "no self-supervised item-tower loss"),
        AblationRow("no_item_id_dropout", ["train.item_id_dropout=0"],
                    "every positive's id shown to the item tower; items without interactions keep their own rows"),
        AblationRow("no_behaviour_counts", ["model.behaviour_counts=false"],
                    "user tower without the interaction counts over windows (recent items kept)"),
        AblationRow("ssl_random", [f"train.ssl_weight={ssl}", "train.ssl_masking=random"],
                    "SSL with random feature masking"),
        AblationRow("ssl_correlated", [f"train.ssl_weight={ssl}", "train.ssl_masking=correlated"],
                    "SSL with correlated feature masking"),
        AblationRow("learned_temperature", ["model.learn_temperature=true"],
                    "softmax temperature trained with the towers (from model.temperature)"),
        AblationRow("loss_listwise", ["train.loss=listwise"], "sampled softmax"),
        AblationRow("loss_pairwise", ["train.loss=pairwise"], "BPR"),
        AblationRow("loss_pointwise", ["train.loss=pointwise"], "binary cross-entropy"),
    ]


# Every run trains the evaluation model only: the refit on all rows is not scored.
FIXED = ["train.refit_full=false"]
COLUMNS = ("recall", "ndcg", "tail_recall")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _run_once(raw: dict[str, Any], overrides: list[str], work: Path, with_ease: bool, k: int) -> dict:
    """sample → train → evaluate in `work` with these overrides; the metrics at K and train seconds."""
    from flows.params import apply_overrides, validate_params
    from flows.stages.registry import run_stage

    params = validate_params(apply_overrides(raw, overrides + [f"evaluate.ease={str(with_ease).lower()}"]),
                             origin="ablation overrides")
    run_stage("sample", params, work)
    t0 = time.perf_counter()
    run_stage("train", params, work)
    train_seconds = time.perf_counter() - t0
    run_stage("evaluate", params, work)
    metrics = json.loads((params.paths.resolved(work).reports / "metrics.json").read_text())
    out = {c: metrics["two_tower"][f"{c}@{k}"] for c in COLUMNS}
    out["train_seconds"] = round(train_seconds, 2)
    out["_metrics"] = metrics
    return out


def _copy_inputs(raw_paths: dict[str, Any], root: Path, work: Path) -> list[str]:
    """Copy the ingested and training folders into `work`; path overrides pointing every stage there."""
    overrides = []
    for key in ("ingested", "training"):
        src = Path(raw_paths[key])
        src = src if src.is_absolute() else root / src
        if not src.exists():
            raise TowerflowError(f"{src}: not found; run `towerflow run --until materialize` first")
        shutil.copytree(src, work / key)
        overrides.append(f"paths.{key}={work / key}")
    for key in ("samples", "model", "reports"):
        overrides.append(f"paths.{key}={work / key}")
    return overrides


def ablate(raw: dict[str, Any], root: Path, out_dir: Path, seeds: list[int], common: list[str] | None = None,
           rows: list[AblationRow] | None = None, log=None) -> dict:  # noqa: ANN001
    """Run every row for every seed; write out_dir/ablation.{json,md}; return the JSON summary.

    raw: params.yaml as a dict (paths relative to root); common: overrides applied to every row.
    """
    from flows.params import apply_overrides, validate_params

    log = log or (lambda line: print(line, flush=True))   # flushed: a long run is watched through a log file
    import flows.stages.train  # noqa: F401  (imports torch: not counted in the first row's train time)

    common = list(common or [])
    base = validate_params(apply_overrides(raw, common), origin="ablation --set overrides")
    rows = default_rows(base) if rows is None else rows
    k = min(base.evaluate.ks)
    summary: dict[str, Any] = {"k": k, "seeds": seeds, "common_overrides": common + FIXED, "rows": []}
    with tempfile.TemporaryDirectory(prefix="towerflow-ablate-") as tmp:
        work = Path(tmp)
        redirect = _copy_inputs(base.paths.model_dump(mode="json"), root, work)
        raw = apply_overrides(raw, redirect)
        reference = validate_params(apply_overrides(raw, common + FIXED), origin="ablation baseline")
        for row in rows:
            entry: dict[str, Any] = {"name": row.name, "overrides": row.overrides, "note": row.note}
            try:
                row_params = validate_params(apply_overrides(raw, common + FIXED + row.overrides),
                                             origin=f"row {row.name}")
            except ConfigError as exc:  # a param this version does not have: report, do not fail the table
                entry.update(status="skipped", reason=str(exc))
                summary["rows"].append(entry)
                log(f"{row.name:<24} skipped: {exc}")
                continue
            if row.overrides and row_params == reference:
                entry.update(status="skipped", reason="same params as the baseline row")
                summary["rows"].append(entry)
                log(f"{row.name:<24} = baseline")
                continue
            runs = _run_seeds(raw, common + FIXED + row.overrides, work, seeds, k, row.name, entry, summary, log)
            if entry.get("status") == "failed":
                summary["rows"].append(entry)
                continue
            columns = [*COLUMNS, "train_seconds"]
            entry.update(status="ok", runs=runs,
                         mean={c: round(statistics.fmean(r[c] for r in runs), 6) for c in columns},
                         std={c: round(_std([r[c] for r in runs]), 6) for c in columns})
            summary["rows"].append(entry)
            _write(summary, out_dir)   # after each row: a long run leaves a partial table if stopped
    _write(summary, out_dir)
    return summary


def _run_seeds(raw: dict[str, Any], overrides: list[str], work: Path, seeds: list[int], k: int, name: str,
               entry: dict[str, Any], summary: dict[str, Any], log) -> list[dict]:  # noqa: ANN001
    """One row's runs, a seed each. The first run of the table also records the baselines (EASE and
    most popular do not depend on the row). A failure marks the entry failed and stops the row."""
    runs = []
    for seed in seeds:
        with_ease = "baselines" not in summary
        try:
            result = _run_once(raw, overrides + [f"base.seed={seed}"], work, with_ease, k)
        except TowerflowError as exc:  # e.g. a row that needs ranking logs the data lacks
            entry.update(status="failed", reason=f"seed {seed}: {exc}")
            log(f"{name:<24} failed: {exc}")
            break
        metrics = result.pop("_metrics")
        if with_ease:
            summary["baselines"] = {b: {c: metrics[b].get(f"{c}@{k}") for c in COLUMNS}
                                    if "skipped" not in metrics[b] else metrics[b]
                                    for b in ("most_popular", "ease")}
            summary["baselines"]["ease_lambda"] = metrics.get("ease_lambda")
        runs.append({"seed": seed, **result})
        log(f"{name:<24} seed {seed}: " + ", ".join(f"{c}@{k}={result[c]:.4f}" for c in COLUMNS)
            + f", train {result['train_seconds']:.1f}s")
    return runs


def _write(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "ablation.md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    """The ablation table: one line per row, mean ± std over seeds, then the non-learned baselines."""
    k = summary["k"]
    lines = [f"# Ablation: two-tower, {len(summary['seeds'])} seeds ({', '.join(map(str, summary['seeds']))}), "
             "mean ± std", "",
             f"Common overrides: `{' '.join(summary['common_overrides']) or '-'}`. Full-catalog ranking on the "
             "temporal holdout (reports/metrics.json protocol).", "",
             f"| row | overrides | R@{k} | NDCG@{k} | tail R@{k} | train s |", "|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        overrides = " ".join(f"`{o}`" for o in row["overrides"]) or "-"
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | {overrides} | {row['status']}: {row['reason']} | | | |")
            continue
        cells = [f"{row['mean'][c]:.4f} ± {row['std'][c]:.4f}" for c in COLUMNS]
        cells.append(f"{row['mean']['train_seconds']:.1f} ± {row['std']['train_seconds']:.1f}")
        lines.append(f"| {row['name']} | {overrides} | " + " | ".join(cells) + " |")
    for name, values in summary.get("baselines", {}).items():
        if not isinstance(values, dict):
            continue
        if "skipped" in values:
            lines.append(f"| {name} (baseline) | - | skipped: {values['skipped']} | | | |")
            continue
        label = name + (f" (λ={summary['baselines'].get('ease_lambda'):g})" if name == "ease" else "")
        lines.append(f"| {label} | - | " + " | ".join(f"{values[c]:.4f}" for c in COLUMNS) + " | - |")
    return "\n".join(lines) + "\n"


def run_cli(params_file: Path, overrides: list[str], n_seeds: int, only: list[str] | None,
            out_dir: Path | None) -> dict:
    """`towerflow ablate`: default_rows (or `only` of them), seeds base.seed, base.seed+1, ..."""
    from flows.params import apply_overrides, read_raw, validate_params

    root = params_file.resolve().parent
    raw = read_raw(params_file)
    params = validate_params(apply_overrides(raw, overrides), origin=f"{params_file} with --set overrides")
    rows = default_rows(params)
    if only:
        unknown = set(only) - {r.name for r in rows}
        if unknown:
            raise TowerflowError(f"unknown ablation rows {sorted(unknown)}; rows are: "
                                 + ", ".join(r.name for r in rows))
        rows = [r for r in rows if r.name in only]
    seeds = [params.base.seed + i for i in range(n_seeds)]
    out = out_dir or params.paths.resolved(root).reports
    summary = ablate(raw, root, out, seeds, common=overrides, rows=rows)
    print(f"written {out / 'ablation.md'} and {out / 'ablation.json'}")
    return summary
