"""Run the expectation suites in a file-backed GX context, build Data Docs, summarize failures.

The context lives in `<context_root>/gx/` (a gitignored place: reports/ by default). Its objects
(datasource, suites, validation definitions, checkpoints, docs site) are created on the first run and
updated on later runs, so a re-run in the same context works. Validation results of earlier runs are
removed first: the docs describe this run's data only, because the docs folder is a stage output
that DVC caches per input version (history lives in DVC/git, not in GX).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd

DATASOURCE = "towerflow_ingested"
SITE = "towerflow_docs"
MAX_EXAMPLES = 5


@dataclass
class Failure:
    """One failed expectation, in the user's terms."""

    table: str
    column: str | None
    expectation: str
    problem: str
    failed_rows: int | None = None
    rows: int | None = None
    examples: list[Any] = field(default_factory=list)
    observed: Any = None
    error: str | None = None

    def line(self) -> str:
        where = f"{self.table}.{self.column}" if self.column else self.table
        if self.error:
            detail = f"could not be checked: {self.error}"
        elif self.failed_rows is not None:
            detail = f"{self.failed_rows} of {self.rows} rows"
            if self.examples:
                detail += ", e.g. " + ", ".join(map(str, self.examples))
        else:
            detail = "" if self.observed is None else f"observed {self.observed}"
        return f"{where}: {self.problem} [{self.expectation}] {detail}".rstrip()


def open_context(root: Path):
    """A file-backed GX context under root/gx/ with analytics and progress bars off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=root)
    # Each setter rewrites great_expectations.yml; skip it when already set so re-runs touch nothing.
    if ctx.config.analytics_enabled is not False:
        ctx.enable_analytics(False)
    bars = ctx.variables.progress_bars  # a ProgressBarsConfig, or a plain dict once read back
    globally = bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", None)
    if globally is not False:
        # tqdm bars on stderr would garble CLI and Prefect logs
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ctx.variables.save()
    return ctx


def _docs_site(ctx, docs_dir: Path) -> None:
    """Point the docs site at docs_dir (add it, or update it if the path changed), then empty it."""
    config = {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs_dir.resolve())},
    }
    sites = ctx.list_data_docs_sites()
    if SITE not in sites:
        ctx.add_data_docs_site(site_name=SITE, site_config=config)
    elif sites[SITE] != config:
        ctx.update_data_docs_site(site_name=SITE, site_config=config)
    ctx.clean_data_docs(site_name=SITE)


def _clear_results(ctx) -> None:
    store = ctx.validation_results_store
    for key in store.list_keys():
        store.remove_key(key)


def _get_or_add(factory, name: str, build):
    from great_expectations.exceptions import DataContextError

    try:
        return factory.get(name)
    except DataContextError:
        return factory.add(build())


def _content(suite) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "id"} for e in suite.to_json_dict()["expectations"]]


def _suite(ctx, name: str, expectations: list):
    """The stored suite, rewritten only when its expectations changed (e.g. a new schema.json).

    `suites.add_or_update` compares every pair of expectations (about a second for ~30); suites are
    stable across runs (the clock is a suite parameter), so comparing plain JSON first is enough.
    """
    import great_expectations as gx

    new = gx.ExpectationSuite(name=name, expectations=expectations)
    suite = _get_or_add(ctx.suites, name, lambda: new)
    if suite is new or _content(suite) == _content(new):
        return suite
    return ctx.suites.add_or_update(new)


def _checkpoint(ctx, table: str, expectations: list):
    """Get or create the suite, validation definition and checkpoint of one table."""
    import great_expectations as gx

    try:
        source = ctx.data_sources.get(DATASOURCE)
    except KeyError:
        source = ctx.data_sources.add_pandas(name=DATASOURCE)
    try:
        asset = source.get_asset(table)
    except LookupError:
        asset = source.add_dataframe_asset(name=table)
    try:
        batch = asset.get_batch_definition("whole")
    except KeyError:
        batch = asset.add_batch_definition_whole_dataframe("whole")
    suite = _suite(ctx, f"{table}_suite", expectations)
    vd = _get_or_add(ctx.validation_definitions, f"{table}_validation", lambda: gx.ValidationDefinition(
        name=f"{table}_validation", data=batch, suite=suite))
    return _get_or_add(ctx.checkpoints, f"{table}_checkpoint", lambda: gx.Checkpoint(
        name=f"{table}_checkpoint", validation_definitions=[vd],
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20}))


def _plain(value: Any) -> Any:
    """A JSON-able, readable form of an example value."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _failures(table: str, run_result) -> list[Failure]:
    out, missing = [], set()
    for r in run_result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        meta, res, info = cfg.meta or {}, r.result or {}, r.exception_info or {}
        column = meta.get("column")
        if cfg.type == "expect_column_to_exist":
            missing.add(column)
        errors = [v["exception_message"] for v in info.values() if isinstance(v, dict)
                  and v.get("raised_exception")]
        if info.get("raised_exception"):
            errors.append(info.get("exception_message"))
        examples: list[Any] = []
        for v in res.get("partial_unexpected_list") or []:
            v = _plain(v)
            if v is not None and v not in examples:
                examples.append(v)
        out.append(Failure(
            table=table, column=column, expectation=cfg.type,
            problem=meta.get("problem", ""), failed_rows=res.get("unexpected_count"),
            rows=res.get("element_count"), examples=examples[:MAX_EXAMPLES],
            observed=_plain(res.get("observed_value")),
            error=str(errors[0]).splitlines()[0] if errors else None))
    # A missing column makes every other expectation on it raise; its one line says it all.
    return [f for f in out if not (f.error and f.column in missing)]


def run_suites(frames: dict[str, pd.DataFrame], suites: dict[str, list], parameters: dict[str, Any],
               context_root: Path, docs_dir: Path) -> tuple[dict[str, dict], list[Failure], Path]:
    """Validate each frame with its suite and suite parameters; build Data Docs into docs_dir (always).

    Returns (per-table stats, failures, docs index path).
    """
    ctx = open_context(context_root)
    _docs_site(ctx, docs_dir)
    _clear_results(ctx)
    stats: dict[str, dict] = {}
    failures: list[Failure] = []
    try:
        for table, expectations in suites.items():
            result = _checkpoint(ctx, table, expectations).run(
                batch_parameters={"dataframe": frames[table]}, expectation_parameters=parameters)
            for vr in result.run_results.values():
                s = vr.statistics
                stats[table] = {"rows": len(frames[table]), "evaluated": s["evaluated_expectations"],
                                "failed": s["unsuccessful_expectations"], "success": bool(vr.success)}
                failures += _failures(table, vr)
    finally:
        # docs of whatever ran, even if GX itself crashed part-way
        ctx.build_data_docs(site_names=[SITE])
    return stats, failures, docs_dir / "index.html"
