"""The pipeline's stages through plain `dvc repro`, no Prefect: dvc.yaml alone builds every output.

Its own module (not test_pipeline.py) so a pytest-xdist worker runs it beside the flow's run.
"""
from __future__ import annotations

import json

import pytest

from flows.stages.registry import STAGES
from tests.project import DVC, make_project, run

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first


def test_dvc_repro_alone_builds_everything_then_does_nothing(tmp_path, contract_source):
    """The same stages through plain `dvc repro` (no Prefect): a second repro reproduces nothing."""
    root = make_project(tmp_path / "dvcproj", contract_source,
                        extra={"data": {"max_users": 150}, "train": {"refit_full": False}})
    first = run([DVC, "repro"], root)
    for name in STAGES:
        assert f"Running stage '{name}'" in first.stdout, first.stdout[-2000:]
    assert json.loads((root / "reports/metrics.json").read_text())["n_users"] <= 150
    second = run([DVC, "repro"], root)
    assert "Running stage" not in second.stdout
    assert json.loads(run([DVC, "status", "--json"], root).stdout or "{}") == {}
