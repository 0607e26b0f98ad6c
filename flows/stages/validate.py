"""Stage validate: check data/ingested/* with Great Expectations before anything learns from it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flows.errors import MissingStageInput
from flows.portal.docs import localize_offline
from validation.batches import Source
from validation.contract import TABLES, read_schema, validate_contract
from validation.params import ValidateParams


def _ingested(path: Path) -> Path:
    if not path.exists():
        raise MissingStageInput(f"{path}: not found; run `towerflow stage ingest` first")
    return path


def validate(validate_cfg: ValidateParams, ingested: Path, docs_dir: Path, summary_path: Path,
             context_root: Path, assets_cache: Path | None = None) -> dict[str, Any]:
    """Validate the ingested tables with the contract gate (validation/contract.py).

    Writes docs_dir/ (GX Data Docs, index.html) on every run, pass or fail, and summary_path
    (per table: rows, expectations evaluated/failed/warned; the failures and the warnings). The GX
    context lives in context_root/gx/, the previous run's row counts in context_root/volume.json
    (updated only when the run passes). With assets_cache, the Data Docs are rewritten to load
    vendored assets only (flows/portal/docs.py), pass or fail. Raises ValidationFailed (headline + one line per failed
    expectation, then the warnings) when the data must not go on; warnings alone are logged.
    """
    started = time.perf_counter()
    schema = read_schema(_ingested(ingested / "schema.json"))
    sources = {t: Source(t, path=_ingested(ingested / f"{t}.parquet")) for t in TABLES}
    try:
        return validate_contract(validate_cfg, schema, sources, context_root, docs_dir, summary_path,
                                 started=started)
    finally:   # failed data keeps its Data Docs too: they are what a reviewer opens
        if assets_cache is not None:
            localize_offline(docs_dir, assets_cache)
