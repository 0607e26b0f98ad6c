"""Run expectation suites batch by batch in a file-backed GX context, build Data Docs, summarize.

The context lives in `<context_root>/gx/` (`paths.cache/gx`: inside the project, outside git). Its
objects (datasource, suites, validation definitions, one checkpoint per suite, docs sites) are
created on the first run and updated on later runs, so a re-run in the same context works.
Validation results of earlier runs are removed first: the docs describe this run's data only,
because the docs folder is a stage output that DVC caches per input version (history lives in
DVC/git, not in GX).

A table larger than one batch is validated by running its checkpoint once per batch; the results of
each expectation are then summed over the batches (failed rows, rows, examples), and expectations
with `mostly` are re-decided on the sums, so the verdict is the one a single run over the whole
table would give (validation/batches.py makes cross-row checks row-local first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from models.fork_pool import run_jobs
from validation.batches import ROW_STRING_STORAGE, RowBatches

DATASOURCE = "towerflow_ingested"
MAX_EXAMPLES = 5
# BASIC: each expectation's counts and its first unexpected values, which is all the runner reads.
# SUMMARY also lists the index of every unexpected row and a query for them, two more passes over the
# batch per expectation even when nothing fails (a fifth of the validate stage on a 14M-row log).
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 20}


@dataclass
class Failure:
    """One failed expectation, in the user's terms."""

    table: str
    column: str | None
    expectation: str
    problem: str
    check: str = "values"
    severity: str = "error"
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


@dataclass
class Check:
    """One suite to run over the batches of one table (one batch for small tables and samples)."""

    table: str
    suite: str
    expectations: list
    batches: Callable[[], Iterable[pd.DataFrame]]


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


def _docs_site(ctx, site: str, docs_dir: Path) -> None:
    """Point the docs site at docs_dir (add it, or update it if its config changed: another path, or a
    context made before its views were ours), then empty it."""
    from validation.docs_views import IndexPageView, PageView

    page_view = {"module_name": PageView.__module__, "class_name": PageView.__name__}
    config = {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                               "view": {"module_name": IndexPageView.__module__, "class_name": IndexPageView.__name__}},
        # GX's page views, each template compiled once per process (validation/docs_views.py)
        "site_section_builders": {section: {"view": page_view} for section in ("expectations", "validations",
                                                                               "profiling")},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs_dir.resolve())},
    }
    sites = ctx.list_data_docs_sites()
    if site not in sites:
        ctx.add_data_docs_site(site_name=site, site_config=config)
    elif sites[site] != config:
        ctx.update_data_docs_site(site_name=site, site_config=config)
    ctx.clean_data_docs(site_name=site)


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
    stable across runs (run-time values are suite parameters), so comparing plain JSON first is enough.
    """
    import great_expectations as gx

    new = gx.ExpectationSuite(name=name, expectations=expectations)
    suite = _get_or_add(ctx.suites, name, lambda: new)
    if suite is new or _content(suite) == _content(new):
        return suite
    return ctx.suites.add_or_update(new)


def _checkpoint(ctx, name: str, expectations: list):
    """Get or create the suite, validation definition and checkpoint of one suite name."""
    import great_expectations as gx

    try:
        source = ctx.data_sources.get(DATASOURCE)
    except KeyError:
        source = ctx.data_sources.add_pandas(name=DATASOURCE)
    try:
        asset = source.get_asset(name)
    except LookupError:
        asset = source.add_dataframe_asset(name=name)
    try:
        batch = asset.get_batch_definition("whole")
    except KeyError:
        batch = asset.add_batch_definition_whole_dataframe("whole")
    suite = _suite(ctx, f"{name}_suite", expectations)
    vd = _get_or_add(ctx.validation_definitions, f"{name}_validation", lambda: gx.ValidationDefinition(
        name=f"{name}_validation", data=batch, suite=suite))
    checkpoint = _get_or_add(ctx.checkpoints, f"{name}_checkpoint", lambda: gx.Checkpoint(
        name=f"{name}_checkpoint", validation_definitions=[vd], result_format=RESULT_FORMAT))
    if checkpoint.result_format != RESULT_FORMAT:      # a project validated by an older towerflow
        checkpoint.result_format = RESULT_FORMAT
        checkpoint.save()
    return checkpoint


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


@dataclass
class _Sum:
    """One expectation's results summed over the batches of a table."""

    config: Any
    success: bool = True
    failed: int | None = None
    rows: int | None = None
    missing: int = 0
    examples: list[Any] = field(default_factory=list)
    observed: Any = None
    error: str | None = None

    def add(self, r) -> None:
        res, info = r.result or {}, r.exception_info or {}
        self.success &= bool(r.success)
        if "unexpected_count" in res and res["unexpected_count"] is not None:
            self.failed = (self.failed or 0) + int(res["unexpected_count"])
            self.rows = (self.rows or 0) + int(res.get("element_count") or 0)
            self.missing += int(res.get("missing_count") or 0)
        for v in res.get("partial_unexpected_list") or []:
            v = _plain(v)
            if v is not None and v not in self.examples and len(self.examples) < MAX_EXAMPLES:
                self.examples.append(v)
        if not r.success and self.observed is None:
            self.observed = _plain(res.get("observed_value"))
        errors = [v["exception_message"] for v in info.values() if isinstance(v, dict)
                  and v.get("raised_exception")]
        if info.get("raised_exception"):
            errors.append(info.get("exception_message"))
        if errors and self.error is None:
            self.error = str(errors[0]).splitlines()[0]

    def decided(self) -> bool:
        """The verdict over all batches: `mostly` is re-decided on the summed counts."""
        mostly = self.config.kwargs.get("mostly")
        if mostly is None or self.failed is None or self.error:
            return self.success
        valid = self.rows - self.missing
        return valid == 0 or (valid - self.failed) / valid >= mostly


def _store_merged(ctx, stored: list, sums: list[_Sum], batches: int) -> None:
    """Replace a table's per-batch validation results by one result over the whole table, so that
    Data Docs show one page per table with the summed counts (the batch results are the inputs)."""
    store = ctx.validation_results_store
    first_key, merged = stored[0]
    for key, _ in stored:
        store.remove_key(key)
    for s, r in zip(sums, merged.results):
        r.success = s.decided()
        if r.result is not None and s.failed is not None:
            valid = s.rows - s.missing
            r.result.update({
                "element_count": s.rows, "missing_count": s.missing, "unexpected_count": s.failed,
                "unexpected_percent": 100.0 * s.failed / valid if valid else 0.0,
                "unexpected_percent_total": 100.0 * s.failed / s.rows if s.rows else 0.0,
                "missing_percent": 100.0 * s.missing / s.rows if s.rows else 0.0,
                "partial_unexpected_list": list(s.examples)})
    passed = sum(r.success for r in merged.results)
    merged.success = passed == len(merged.results)
    merged.statistics.update({"successful_expectations": passed,
                              "unsuccessful_expectations": len(merged.results) - passed,
                              "success_percent": 100.0 * passed / max(len(merged.results), 1)})
    merged.meta["batches"] = batches
    store.set(first_key, merged)


def _failures(check: Check, sums: list[_Sum], parameters: dict[str, Any],
              severity: dict[str, str]) -> list[Failure]:
    out = []
    for s in sums:
        if s.decided():
            continue
        config = s.config
        meta = config.meta or {}
        column, kind = meta.get("column"), meta.get("check", "values")
        problem = meta.get("problem", "")
        if meta.get("template"):
            problem = problem.format_map(parameters)
        failed, rows, examples, observed = s.failed, s.rows, s.examples, s.observed
        if meta.get("scalar"):  # a one-row frame of counts: the value is the observation
            failed, rows, examples, observed = None, None, [], (examples or [observed])[0]
        out.append(Failure(
            table=meta.get("table", check.table), column=column, expectation=config.type,
            problem=problem, check=kind, severity=severity.get(kind, "error"), failed_rows=failed,
            rows=rows, examples=examples, observed=observed, error=s.error))
    return out


def _one_line_per_cause(failures: list[Failure]) -> list[Failure]:
    """A missing column makes every other expectation on it raise, and a column of the wrong kind
    (naive timestamps) makes each comparison raise the same error: one line says it all."""
    missing = {(f.table, f.column) for f in failures if f.expectation == "expect_column_to_exist"}
    seen, out = set(), []
    for f in failures:
        if f.error and ((f.table, f.column) in missing or (f.table, f.column, f.error) in seen):
            continue
        if f.error:
            seen.add((f.table, f.column, f.error))
        out.append(f)
    return out


def _run_batch(checkpoint, check: Check, parameters: dict[str, Any], index: int, frame: pd.DataFrame) -> list:
    """One batch's (result key, suite validation result) pairs."""
    from great_expectations.core.run_identifier import RunIdentifier

    # one block per dtype, once: GX copies and filters the whole frame for many metrics, and each
    # copy of a frame built column by column merges its blocks again (a third of a training-set
    # check's time)
    frame = frame.copy()
    # named per batch: batches checked at once in several processes get keys of their own. GX
    # resolves the type name "StringDtype" to the default storage's dtype: the frames' own
    with pd.option_context("mode.string_storage", ROW_STRING_STORAGE):
        result = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters,
                                run_id=RunIdentifier(run_name=f"{check.suite}-batch-{index}"))
    return list(result.run_results.items())


def _run_share(share: tuple[int, int], inherited: tuple[Any, Check, dict[str, Any]]) -> list[tuple[int, list]]:
    """In a forked worker: the batches of one share (a run of consecutive ones), with their indexes."""
    checkpoint, check, parameters = inherited
    return [(i, _run_batch(checkpoint, check, parameters, i, frame))
            for i, frame in zip(check.batches.indexes(share), check.batches(share), strict=True)]


def run_checks(checks: list[Check], parameters: dict[str, Any], severity: dict[str, str],
               context_root: Path, site: str, docs_dir: Path,
               workers: int = 1) -> tuple[dict[str, dict], list[Failure], Path]:
    """Run each check's checkpoint over its batches; build Data Docs into docs_dir (always). A table of
    several batches is checked by `workers` processes at once (validate.workers), the same results.

    Returns (per-table stats, failures with their severity, docs index path).
    """
    ctx = open_context(context_root)
    _docs_site(ctx, site, docs_dir)
    _clear_results(ctx)
    stats: dict[str, dict] = {}
    failures: list[Failure] = []
    try:
        for check in checks:
            checkpoint = _checkpoint(ctx, check.suite, check.expectations)
            shares = min(workers, check.batches.count) if isinstance(check.batches, RowBatches) else 1
            if shares > 1:
                # a large table's batches in forked processes, each taking a run of consecutive
                # batches (they inherit the context and checkpoint); the results come back in order
                jobs = [(f"{check.suite} share {k}", partial(_run_share, (k, shares))) for k in range(shares)]
                per_share = run_jobs(jobs, (checkpoint, check, parameters), shares, threads=1)
                results = [r for _, r in sorted((r for rs in per_share for r in rs), key=lambda r: r[0])]
            else:
                results = [_run_batch(checkpoint, check, parameters, i, frame)
                           for i, frame in enumerate(check.batches())]
            sums: list[_Sum] | None = None
            batches, stored = 0, []
            for run_results in results:
                for key, vr in run_results:
                    if sums is None:
                        sums = [_Sum(r.expectation_config) for r in vr.results]
                    for s, r in zip(sums, vr.results):
                        s.add(r)
                    stored.append((key, vr))
                batches += 1
            if batches > 1 and sums:
                _store_merged(ctx, stored, sums, batches)
            failures += _failures(check, sums or [], parameters, severity)
            t = stats.setdefault(check.table, {"evaluated": 0, "batches": 0})
            t["evaluated"] += len(sums or [])
            t["batches"] += batches
    finally:
        # docs of whatever ran, even if GX itself crashed part-way
        ctx.build_data_docs(site_names=[site])
    failures = _one_line_per_cause(failures)
    for name, t in stats.items():
        t["failed"] = sum(f.severity == "error" for f in failures if f.table == name)
        t["warned"] = sum(f.severity == "warn" for f in failures if f.table == name)
        t["success"] = t["failed"] == 0
    return stats, failures, docs_dir / "index.html"
