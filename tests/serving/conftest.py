"""A tiny project run once per session through the real stages up to train (ingest, materialize
with a real Feast repo, sample, train one CPU epoch); publish/serving tests start from it."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.once import built_once


def _build(root: Path, string_ids: bool) -> None:
    from datagen import make_contract_dataset
    from features.params import FeaturesParams
    from flows.params import DataParams, SimulatorParams
    from flows.stages.ingest import ingest
    from flows.stages.materialize import materialize
    from flows.stages.sample import sample
    from flows.stages.train import train
    from models.params import ModelParams, SampleParams, SplitParams, TrainParams

    src = make_contract_dataset(root / "source", n_users=60, n_items=50, seed=4, string_ids=string_ids)
    ingested, training = root / "data/ingested", root / "data/training"
    ingest(DataParams(source=str(src), ranking_logs="none"), SimulatorParams(), 0, root / "cache", ingested)
    materialize(SplitParams(), FeaturesParams(history_length=10), ingested, root / "data/features",
                root / "data/feast", training)
    sample(SampleParams(popular_threshold=0.01), 0, training, None, root / "data/samples")
    train(ModelParams(dim=8, embedding_dim=8, hidden=[16]), TrainParams(epochs=1, batch_size=128, threads=1), 0,
          root / "data/samples", training, ingested / "schema.json", root / "artifacts/model")


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory) -> Any:
    """trained_root(string_ids) -> the run's project folder (params.yaml paths layout), built once
    for every xdist worker; read it, or copy it before writing (as `project` does)."""
    def get(string_ids: bool = False) -> Path:
        return built_once(tmp_path_factory, "trained_str" if string_ids else "trained_int",
                          lambda root: _build(root, string_ids))
    return get


@pytest.fixture
def project(trained_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the int-id project (tests may overwrite its model), with a params.yaml
    whose paths are the defaults, so `towerflow --params <root>/params.yaml` works on it."""
    monkeypatch.delenv("QDRANT_URL", raising=False)
    root = tmp_path / "proj"
    shutil.copytree(trained_root(False), root, ignore=shutil.ignore_patterns("source", "cache", "samples"))
    write_params(root)
    return root


def write_params(root: Path, publish: dict | None = None) -> Path:
    """params.yaml for the project, and the gate decision `towerflow stage publish` requires (these
    tests are about publishing; the gate has its own tests)."""
    gate = root / "reports" / "gate.json"
    gate.parent.mkdir(parents=True, exist_ok=True)
    gate.write_text('{"passed": true, "checks": [], "reasons": []}\n')
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"publish": {"verify_users": 20, "upsert_batch": 20, **(publish or {})}}))
    return path
