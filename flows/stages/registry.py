"""The one place that wires Params to each stage's typed arguments.

`towerflow stage <name>` calls `run_stage`; dvc.yaml runs that command; the Prefect flow reproduces the
DVC stages. Stage modules are imported lazily so that `towerflow --help` does not import torch/feast.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

from flows.params import Params, PathsParams, event_rules, resolve_source, validate_for_source
from models.import_hiding import import_hiding

STAGES: tuple[str, ...] = (
    "ingest", "validate", "materialize", "sample", "train", "rank", "evaluate", "report", "gate", "publish",
)


# The libraries each stage's code imports, most of them lazily inside its functions. `towerflow stage`,
# a process for one stage, imports them first with the garbage collector paused and freezes them
# (flows/environment.py import_frozen); a library left out costs only that saving.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "ingest": ("pandas", "pyarrow.parquet"),
    "validate": ("great_expectations",),
    "materialize": ("feast", "great_expectations"),
    "sample": ("pandas", "pyarrow.parquet"),
    "train": ("torch", "pandas", "pyarrow.parquet"),
    "rank": ("torch", "lightgbm", "pandas", "pyarrow.parquet"),
    "evaluate": ("torch", "pandas", "pyarrow.parquet"),
    "report": ("evidently",),
    "gate": (),
    "publish": ("torch", "qdrant_client", "pandas", "pyarrow.parquet"),
}


def _feast_without_torch() -> None:
    from features.store import import_feast_without_torch
    import_feast_without_torch()


# Libraries whose plain import does more than a stage needs. Feast's imports torch (2.4 s of CPU of
# a 2-core machine's 6.5 s for materialize's libraries), for tensor outputs no stage asks Feast for;
# a stage that uses torch lists it first, and Feast then imports as it is. GX's imports pyspark and
# SQLAlchemy (0.6-0.9 s of its ~4.5 s) for Spark and SQL datasources no stage adds; in materialize,
# Feast has already imported SQLAlchemy, which then stays as it is.
IMPORTERS: dict[str, Callable[[], None]] = {
    "feast": _feast_without_torch,
    "great_expectations": partial(import_hiding, "great_expectations", ("pyspark", "sqlalchemy")),
}


def import_stage_libraries(name: str) -> None:
    """Before a `towerflow stage` process runs stage `name`: its libraries, imported and frozen."""
    from flows.environment import import_frozen
    import_frozen(LIBRARIES[name], IMPORTERS)


def _ingest(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.ingest import ingest
    return ingest(p.data, p.simulator, p.base.seed, cache_dir=paths.cache, out_dir=paths.ingested,
                  events_dir=p.serve.events_dir, rules=event_rules(p.data, p.validate, p.serve))


def _validate(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.validate import validate
    return validate(validate_for_source(p.data, p.validate), paths.ingested, docs_dir=paths.reports / "validation",
                    summary_path=paths.reports / "validation.json", context_root=paths.cache / "gx",
                    assets_cache=paths.cache / "vendor")


def _materialize(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.materialize import materialize
    from validation.training_set import TrainingSetChecks
    checks = TrainingSetChecks(validate_for_source(p.data, p.validate), context_root=paths.cache / "gx",
                               docs_dir=paths.reports / "training_validation")
    return materialize(p.split, p.features, paths.ingested, features_dir=paths.features,
                       feast_dir=paths.feast, training_dir=paths.training, checks=checks,
                       assets_cache=paths.cache / "vendor", events_dir=p.serve.events_dir if p.data.events else None,
                       rules=event_rules(p.data, p.validate, p.serve))


def _sample(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.sample import sample
    return sample(p.sample, p.base.seed, paths.training, paths.ingested / "ranking_logs.parquet",
                  out_dir=paths.samples)


def _train(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.train import train
    return train(p.model, p.train, p.base.seed, paths.samples, paths.training, paths.ingested / "schema.json",
                 out_dir=paths.model, published_dir=paths.published)


def _rank(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.rank import rank
    retrieval = paths.model / "full" if p.rank.retrieval_embeddings else None
    return rank(p.rank, p.base.seed, paths.ingested, retrieval, out_dir=paths.ranker,
                report_path=paths.reports / "ranking.json")


def _evaluate(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.evaluate import evaluate
    return evaluate(p.evaluate, paths.training, paths.model / "eval", out_path=paths.reports / "metrics.json",
                    recs_path=paths.reports / "quality" / "recs.parquet", published_dir=paths.published,
                    schema_path=paths.ingested / "schema.json", champion_path=paths.reports / "champion.json",
                    device=p.train.device)


def _publish(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.publish import publish
    return publish(paths.model / "full", paths.training, paths.ingested / "schema.json", p.publish,
                   published_dir=paths.published, seed=p.base.seed, reports_dir=paths.reports,
                   ranker_dir=paths.ranker, eval_model_dir=paths.model / "eval")


def _report(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.report import report
    return report(p.report, p.gate.max_drift_share, p.base.seed, paths.ingested, paths.training,
                  recs_path=paths.reports / "quality" / "recs.parquet", published_dir=paths.published,
                  drift_dir=paths.reports / "drift", quality_dir=paths.reports / "quality",
                  champion_path=paths.reports / "champion.json",
                  compare_across_sources=p.gate.compare_across_sources)


def _gate(p: Params, paths: PathsParams) -> dict[str, Any]:
    from flows.stages.gate import gate
    return gate(p.gate, paths.reports / "metrics.json", paths.reports / "quality" / "quality.json",
                paths.reports / "drift" / "summary.json", out_path=paths.reports / "gate.json",
                portal=p.paths.reports / "index.html",   # as the user wrote it: relative to the project
                champion_path=paths.reports / "champion.json")


_RUNNERS: dict[str, Callable[[Params, PathsParams], dict[str, Any]]] = {
    "ingest": _ingest, "validate": _validate, "materialize": _materialize, "sample": _sample,
    "train": _train, "rank": _rank, "evaluate": _evaluate, "report": _report, "gate": _gate, "publish": _publish,
}


def run_stage(name: str, params: Params, root: Path) -> dict[str, Any]:
    """Run one stage in this process with paths resolved against the project root."""
    events_dir = root / params.serve.events_dir     # an absolute events_dir stays as it is
    params = params.model_copy(update={"data": resolve_source(params.data, root),
                                       "serve": params.serve.model_copy(update={"events_dir": events_dir})})
    return _RUNNERS[name](params, params.paths.resolved(root))
