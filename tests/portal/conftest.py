"""Fixtures of the portal tests: the vendored assets and a tiny real run (tests/portal/run_outputs.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.portal.build import PortalInputs
from flows.portal.vendor import DEFAULT_CACHE, ensure_assets

from tests.portal.run_outputs import make_drift_report, make_gx_site, tiny_tables, write_plain_outputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def assets() -> Path:
    """The project's vendored assets (`make vendor`, which `make setup` runs; fetched here if absent)."""
    return ensure_assets(ROOT / DEFAULT_CACHE)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, assets) -> tuple[Path, PortalInputs]:
    """reports/ and artifacts/ of a tiny run, with real GX and Evidently HTML."""
    base = tmp_path_factory.mktemp("run")
    reports, artifacts = base / "reports", base / "artifacts"
    inputs = write_plain_outputs(reports, artifacts)
    rng = np.random.default_rng(7)
    tables = tiny_tables(rng)
    make_gx_site(base / "gx_contract", reports / "validation", "contract_site", tables)
    make_gx_site(base / "gx_training", reports / "training_validation", "training_site", {"items": tables["items"]})
    make_drift_report(reports / "drift", rng)
    (reports / "validation.json").write_text(json.dumps(  # what the validate stage writes beside the site
        {"success": False, "errors": 1, "warnings": 0, "tables": {"users": {}, "items": {}}}))
    os.utime(reports / "metrics.json", (1_800_000_000, 1_800_000_000))  # after the kept previous run
    return reports, PortalInputs(curves_dir=inputs.curves_dir, publish_record=inputs.publish_record,
                                 assets=assets, title=inputs.title)
