"""Build the portal of the project's current outputs: what the flow calls at the end of every run
(passed, blocked by the gate, or failed: a blocked run is when a reviewer needs it most) and what
`towerflow report build` calls after a plain `dvc repro`."""
from __future__ import annotations

import logging
from pathlib import Path

from flows.params import Params
from flows.portal.build import PortalInputs, build_portal
from flows.portal.vendor import VendorError, ensure_assets
from flows.reports.live import live_bundle
from flows.serving.store import BUNDLE_JSON

log = logging.getLogger("towerflow.portal")


def publish_record(params: Params, root: Path) -> Path | None:
    """The live bundle's record (bundle.json), or None while nothing is published."""
    published = params.paths.resolved(root).published
    live = live_bundle(published)
    record = live.path / BUNDLE_JSON if live is not None else None
    return record if record is not None and record.is_file() else None


def build_run_portal(params: Params, root: Path) -> Path:
    paths = params.paths.resolved(root)
    try:
        assets = ensure_assets(paths.cache / "vendor")
    except VendorError as exc:   # the portal itself needs no assets; only the Data Docs do
        log.warning("report portal: Data Docs keep their CDN links (%s)", exc)
        assets = None
    return build_portal(paths.reports, PortalInputs(curves_dir=paths.model / "curves",
                                                    publish_record=publish_record(params, root),
                                                    assets=assets, title=f"towerflow run — {root.name}"))
