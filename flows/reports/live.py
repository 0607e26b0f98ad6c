"""The live bundle as the reports and the gate see it, and the files of a run that each bundle keeps.

The publish stage writes the bundle store (flows/serving/store.py: one folder per version and a
LIVE pointer), read here through it. A bundle keeps this run's figures and drift sample
(`BUNDLE_FILES`) so that the next run can be compared with the model that is live: its quality
figures, its evaluation metrics and a sample of the data it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from flows.errors import GateBlocked, MissingStageInput, PublishError
from flows.serving.store import EVAL_MODEL_DIR, BundleStore

# file under reports/ → name in the bundle
BUNDLE_FILES = {
    "metrics.json": "metrics.json",                        # evaluate: the gate compares gate.metric
    "quality/quality.json": "quality.json",                # report: Evidently recsys figures
    "drift/reference.parquet": "drift_reference.parquet",  # report: sample of the training frame
    "gate.json": "gate.json",                              # gate: the decision (forced by whom, why)
}


@dataclass
class LiveBundle:
    version: str
    path: Path

    def json(self, name: str) -> dict[str, Any] | None:
        """A JSON file of the bundle, None when this bundle predates it or it is unreadable."""
        file = self.path / name
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def frame(self, name: str) -> pd.DataFrame | None:
        file = self.path / name
        return pd.read_parquet(file) if file.is_file() else None

    def lineage(self) -> dict[str, Any] | None:
        """The source the live model was trained on: bundle.json's "lineage", or, for a bundle that
        predates it, the same figures from the schema.json every bundle keeps; None when neither is."""
        recorded = (self.json("bundle.json") or {}).get("lineage")
        if isinstance(recorded, dict):
            return recorded
        schema = self.json("schema.json")
        return lineage(schema) if schema is not None else None


def lineage(schema: dict[str, Any]) -> dict[str, Any]:
    """What a run's data is: the resolved data.source (ingest writes it into schema.json) and a digest
    of the contract the model reads (id types, feature columns by kind). Serving events appended to a
    source keep its lineage: they are that source's newest rows."""
    contract = {"user_id_dtype": schema.get("user_id_dtype"), "item_id_dtype": schema.get("item_id_dtype"),
                **{side: {kind: sorted((schema.get(side) or {}).get(kind) or [])
                          for kind in ("categorical", "numeric", "multi")}
                   for side in ("user_features", "item_features")}}
    digest = hashlib.sha256(json.dumps(contract, sort_keys=True).encode()).hexdigest()[:16]
    return {"source": schema.get("source"), "schema_digest": digest}


def lineage_change(current: dict[str, Any], live: dict[str, Any] | None, version: str) -> str | None:
    """One line when this run's data is not the live model's lineage (another source, or the same
    source under another contract); None when it is, or when the live bundle does not say."""
    if live is None:
        return None
    if live.get("source") != current.get("source"):
        return f"new source: this run reads {current.get('source')}, live {version} was trained on {live.get('source')}"
    if live.get("schema_digest") != current.get("schema_digest"):
        return (f"new data contract: the id types or feature columns of {current.get('source')} changed since "
                f"live {version} (schema {live.get('schema_digest')} -> {current.get('schema_digest')})")
    return None


def live_bundle(published_dir: Path) -> LiveBundle | None:
    """The bundle LIVE points at; None when nothing was published yet (no LIVE, or it names a version
    that is not there: a bundle cannot be compared with if its files are gone)."""
    store = BundleStore(published_dir)
    try:
        version = store.live()
    except PublishError:   # an unreadable LIVE: nothing to compare with
        return None
    if version is None:
        return None
    path = store.version_dir(version)
    return LiveBundle(version, path) if path.is_dir() else None


def bundle_reports(reports_dir: Path, bundle_dir: Path) -> list[str]:
    """Copy this run's BUNDLE_FILES that exist from reports_dir into bundle_dir (the publish stage
    calls this while it builds a bundle); returns the names written. A missing one is not an error:
    the next gate says which baseline it lacks and skips that comparison (e.g. a report turned off)."""
    bundle_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src, name in BUNDLE_FILES.items():
        if (reports_dir / src).is_file():
            shutil.copy2(reports_dir / src, bundle_dir / name)
            written.append(name)
    return sorted(written)


EVAL_MODEL = EVAL_MODEL_DIR     # in a bundle: the model its run evaluated (trained without that run's holdout)
EVAL_MODEL_FILES = ("model.pt", "encoder.json", "model.json")


def bundle_eval_model(eval_dir: Path, bundle_dir: Path) -> bool:
    """Keep the run's evaluation model in the bundle (publish calls this while it builds one): the next
    run scores it on its own holdout. The served model cannot stand in: it was refit on every row,
    the next holdout's included. False when eval_dir holds no model (the next gate then says so)."""
    if not all((eval_dir / name).is_file() for name in EVAL_MODEL_FILES[:2]):
        return False
    (bundle_dir / EVAL_MODEL).mkdir(parents=True, exist_ok=True)
    for name in EVAL_MODEL_FILES:
        if (eval_dir / name).is_file():
            shutil.copy2(eval_dir / name, bundle_dir / EVAL_MODEL / name)
    return True


def require_passed(gate_path: Path) -> dict[str, Any]:
    """The gate's decision, for the publish stage: refuses to go on unless this run passed it."""
    if not gate_path.is_file():
        raise MissingStageInput(f"{gate_path}: not found; run the gate stage first")
    decision = json.loads(gate_path.read_text())
    if not decision.get("passed"):
        raise GateBlocked(decision.get("message") or f"gate: {gate_path} says this run did not pass")
    return decision
