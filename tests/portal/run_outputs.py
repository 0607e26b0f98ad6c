"""A small but real set of run outputs for the portal tests: real GX Data Docs sites and a real
Evidently drift report made in tmp (CI has no demo run), plus the JSON/CSV files other stages write."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd

from flows.portal.build import PortalInputs


def make_gx_site(context_root: Path, docs_dir: Path, site: str, tables: dict[str, tuple[pd.DataFrame, list]]) -> Path:
    """One checkpoint per table, its results published to a Data Docs site in docs_dir."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=context_root)
    ctx.enable_analytics(False)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(site_name=site, site_config={
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}})
    source = ctx.data_sources.add_pandas(name=f"{site}_src")
    for name, (frame, expectations) in tables.items():
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
        # copies: GX refuses an expectation object that already belongs to another suite
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}_suite", expectations=[copy.copy(e) for e in expectations]))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_vd", data=batch, suite=suite))
        cp = ctx.checkpoints.add(gx.Checkpoint(name=f"{name}_cp", validation_definitions=[vd],
                                               actions=[UpdateDataDocsAction(name="docs", site_names=[site])]))
        cp.run(batch_parameters={"dataframe": frame})
    ctx.build_data_docs(site_names=[site])
    return docs_dir / "index.html"


def tiny_tables(rng: np.random.Generator) -> dict[str, tuple[pd.DataFrame, list]]:
    import great_expectations as gx

    users = pd.DataFrame({"user_id": np.arange(60), "age": rng.integers(18, 70, 60)})
    users.loc[3, "age"] = 150  # one failure, so the pages show unexpected values too
    items = pd.DataFrame({"item_id": np.arange(40), "genre": rng.choice(["a", "b", "c"], 40)})
    e = gx.expectations
    return {
        "users": (users, [e.ExpectColumnValuesToNotBeNull(column="user_id"),
                          e.ExpectColumnValuesToBeUnique(column="user_id"),
                          e.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=120),
                          # rendered with a vega-lite chart: the vega scripts must load
                          e.ExpectColumnKLDivergenceToBeLessThan(
                              column="age", threshold=0.6,
                              partition_object={"bins": [0, 30, 50, 200], "weights": [0.3, 0.4, 0.3]})]),
        "items": (items, [e.ExpectColumnValuesToBeInSet(column="genre", value_set=["a", "b", "c"])]),
    }


def make_drift_report(out_dir: Path, rng: np.random.Generator) -> Path:
    from evidently import Report
    from evidently.presets import DataDriftPreset

    ref = pd.DataFrame({"x": rng.normal(0, 1, 200), "y": rng.choice(["u", "v"], 200)})
    cur = pd.DataFrame({"x": rng.normal(0.8, 1, 200), "y": rng.choice(["u", "v"], 200, p=[0.8, 0.2])})
    out_dir.mkdir(parents=True, exist_ok=True)
    Report([DataDriftPreset()]).run(cur, ref).save_html(str(out_dir / "drift.html"))
    (out_dir / "summary.json").write_text(json.dumps(
        {"drift_share": 0.5, "threshold": 0.5, "drifted_columns": ["x"], "dataset_drift": True}))
    return out_dir / "drift.html"


METRICS = {"two_tower": {"recall@20": 0.231, "ndcg@20": 0.2478}, "ease": {"recall@20": 0.1961, "ndcg@20": 0.2051},
           "ease_lambda": 250.0, "n_users": 943,
           "standard_errors": {"two_tower": {"recall@20": 0.0102, "ndcg@20": 0.0093},
                               "ease": {"recall@20": 0.0097, "ndcg@20": 0.0088}}}
PREVIOUS = {"two_tower": {"recall@20": 0.2246, "ndcg@20": 0.2424}, "ease": {"recall@20": 0.1961, "ndcg@20": 0.2051},
            "ease_lambda": 250.0, "n_users": 943}


def write_plain_outputs(reports: Path, artifacts: Path) -> PortalInputs:
    """metrics (+ the previous run's in history), curves, publish record, gate, ablation table."""
    reports.mkdir(parents=True, exist_ok=True)
    old = reports / "history" / "20260101T000000Z" / "metrics.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(PREVIOUS))
    (reports / "metrics.json").write_text(json.dumps(METRICS, indent=2))
    curves = artifacts / "model" / "curves"
    curves.mkdir(parents=True)
    for name, start in (("eval", 6.9), ("full", 6.7)):
        rows = "\n".join(f"{e},{start - 0.4 * np.log(e):.4f}" for e in range(1, 11))
        (curves / f"{name}.csv").write_text("epoch,loss\n" + rows + "\n")
    manifest = artifacts / "index" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"collection": "towerflow_items_1fec43afffe6", "alias": "towerflow_items",
                                    "version": "1fec43afffe6", "count": 1682, "dim": 64, "verified": True,
                                    "published_at": "2026-11-28T00:16:02+00:00"}))
    (reports / "gate.json").write_text(json.dumps({"passed": True, "reason": "quality within margin, drift 0.11 < 0.5"}))
    (reports / "ablation.md").write_text(
        "# Ablation\n\n| row | R@20 |\n|---|---|\n| baseline | 0.2246 ± 0.0029 |\n| no_logq | 0.1761 ± 0.0035 |\n\n"
        "- **logQ** is the largest lever\n")
    return PortalInputs(curves_dir=curves, publish_record=manifest, title="towerflow test run")
