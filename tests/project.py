"""A temporary towerflow project (git + DVC) holding a copy of this checkout's code, for end-to-end tests."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# the venv's dvc command, as a user's shell finds it after `make setup`
DVC = str(Path(sys.executable).parent / "dvc")

PROJECT_FILES = ["flows", "features", "models", "validation", "dvc.yaml", "params.yaml", "pyproject.toml"]

# Small and fast: a few hundred users, 2 epochs.
SMALL_OVERRIDES = {
    "train": {"epochs": 2, "batch_size": 256},
    "simulator": {"candidates": 40, "ranked": 20, "shown": 5},
    "model": {"hidden": [32], "dim": 16, "embedding_dim": 16},
    # tiny data moves ndcg@20 by a few points between runs: the gate's own tests check its margin
    "gate": {"max_quality_drop": 0.2},
}


def _copy_project(dst: Path) -> None:
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "gx", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@functools.cache
def _dvc_files() -> Path:
    """What `dvc init` and `dvc config core.analytics false` write, made once per process by DVC itself
    (the two commands cost ~1.2 s of CPU; the suite makes a few dozen repos)."""
    made = Path(tempfile.mkdtemp(prefix="towerflow-dvc-init-"))
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    run(["git", "init", "-q"], made)
    run([DVC, "init", "-q"], made)
    run([DVC, "config", "core.analytics", "false"], made)
    shutil.rmtree(made / ".git")
    shutil.rmtree(made / ".dvc" / "tmp", ignore_errors=True)    # DVC's own scratch: made on first use
    return made


def git_dvc_repo(root: Path) -> None:
    """Make `root` a git repo (a test author) with DVC initialized in it, analytics off."""
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "t@example.com"], root)
    run(["git", "config", "user.name", "t"], root)
    shutil.copytree(_dvc_files(), root, dirs_exist_ok=True)


def make_project(root: Path, source: Path, extra: dict | None = None) -> Path:
    """A fresh git + DVC repo holding the project's code, with params pointing at `source`."""
    _copy_project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params = _merge(params, SMALL_OVERRIDES)
    params = _merge(params, {"data": {"source": str(source)}})
    params = _merge(params, extra or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_dvc_repo(root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)
    return root
