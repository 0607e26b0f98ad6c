"""dvc.yaml names, for each stage, exactly the project modules the stage runs: its own module and
everything it imports from flows/features/models/validation (error modules aside: a message does not
change an output). Editing a benchmark, a test, the CLI or the README then reruns nothing, and editing
a module a stage runs reruns that stage."""
from __future__ import annotations

from pathlib import Path

import grimp
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "features", "models", "validation")


def _module_files(stage: str, graph: grimp.ImportGraph) -> set[str]:
    module = f"flows.stages.{stage}"
    modules = graph.find_upstream_modules(module) | {module}
    return {_file(m) for m in modules if not m.endswith(".errors")}


def _file(module: str) -> str:
    """A module's file: a package is its __init__.py."""
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_each_stage_depends_on_exactly_the_modules_it_runs(dvc_stages):
    graph = grimp.build_graph(*PACKAGES)
    for name, stage in dvc_stages.items():
        declared = {d for d in stage.get("deps", []) if d.endswith(".py")}
        expected = _module_files(name, graph)
        assert declared == expected, (f"dvc.yaml stage '{name}': missing {sorted(expected - declared)}, "
                                      f"not run by the stage {sorted(declared - expected)}")


def test_no_stage_depends_on_a_folder_of_code_or_an_experiment(dvc_stages):
    for name, stage in dvc_stages.items():
        for dep in stage.get("deps", []):
            assert dep.rstrip("/") not in PACKAGES, f"{name}: '{dep}' is a whole package"
            assert "experiments" not in dep and not dep.startswith("tests"), f"{name}: '{dep}'"
