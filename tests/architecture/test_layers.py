"""The layer contracts of pyproject.toml ([tool.importlinter]), checked by import-linter itself."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "features", "models", "validation")


def _lint(project: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages importable from `project` (first on the path)."""
    env = dict(os.environ, PYTHONPATH=str(project))
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(exe), "--config", str(project / "pyproject.toml"), "--no-cache"],
                          cwd=project, env=env, capture_output=True, text=True)


def _copy(dst: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_its_layers():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower() or " 0 broken" in proc.stdout.lower()


def test_a_library_importing_flows_breaks_the_contract(tmp_path):
    project = _copy(tmp_path)
    towers = project / "models" / "towers.py"
    towers.write_text(towers.read_text() + "\nfrom flows.errors import TowerflowError  # planted\n")
    proc = _lint(project)
    assert proc.returncode != 0
    assert "models.towers -> flows.errors" in proc.stdout


def test_a_stage_importing_an_experiment_breaks_the_contract(tmp_path):
    project = _copy(tmp_path)
    stage = project / "flows" / "stages" / "evaluate.py"
    stage.write_text(stage.read_text() + "\nimport flows.experiments.bench  # planted\n")
    proc = _lint(project)
    assert proc.returncode != 0
    assert "flows.stages.evaluate -> flows.experiments.bench" in proc.stdout


def test_an_import_circle_in_serving_breaks_the_contract(tmp_path):
    project = _copy(tmp_path)
    recommend = project / "flows" / "serving" / "recommend.py"
    recommend.write_text(recommend.read_text() + "\nfrom flows.serving.items import add_items  # planted\n")
    proc = _lint(project)
    assert proc.returncode != 0
    assert "flows.serving.recommend -> flows.serving.items" in proc.stdout
