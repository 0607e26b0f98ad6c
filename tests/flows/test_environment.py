"""flows/environment.py: what every `towerflow` command sets before any library is imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Feast's FeatureView.__init__ as Feast's import left it: typeguard's instrumented copy calls its
# checker (typeguard.TypeCheckMemo) from the method's own code
PROBE = """
import sys
from pathlib import Path
from flows.environment import configure_environment
configure_environment(Path(sys.argv[1]))
from feast import FeatureView
print("instrumented" if "TypeCheckMemo" in FeatureView.__init__.__code__.co_names else "as written")
"""


@pytest.mark.parametrize(("keep", "expected"), [(None, "as written"), ("1", "instrumented")])
def test_feast_is_imported_without_typeguard_instrumentation_unless_asked(
        tmp_path: Path, keep: str | None, expected: str) -> None:
    """Recompiling Feast's methods with type checks was half of `import feast` (the cold start of
    `towerflow recommend`); TOWERFLOW_TYPEGUARD=1 keeps them."""
    env = {k: v for k, v in os.environ.items() if k != "TOWERFLOW_TYPEGUARD"}
    if keep is not None:
        env["TOWERFLOW_TYPEGUARD"] = keep
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_a_run_started_from_python_turns_telemetry_off_and_keeps_a_users_choice(monkeypatch, tmp_path):
    """`run_pipeline` called from Python (a notebook, a user's scheduler) does not go through the CLI's
    configure_environment: it turns telemetry off itself, before Prefect starts its temporary server
    (which reads the variables when it starts) and before any stage process inherits them."""
    from flows.environment import TELEMETRY_OFF
    from flows.errors import ConfigError
    from flows.pipeline import run_pipeline

    for key in TELEMETRY_OFF:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "0")
    with pytest.raises(ConfigError, match="params file not found"):
        run_pipeline(tmp_path)                       # no params.yaml: stops before any flow runs
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and os.environ["DO_NOT_TRACK"] == "1"
    assert os.environ["GX_ANALYTICS_ENABLED"] == "false" and os.environ["DVC_NO_ANALYTICS"] == "0"


FREEZE_PROBE = """
import gc, sys
sys.path.insert(0, sys.argv[1])
from flows.environment import import_frozen
before = gc.get_freeze_count()
import_frozen(["probe_library", "no_such_library_anywhere"])   # the second: left to the stage's own error
import probe_library
print(probe_library.COLLECTOR_ON_AT_IMPORT, gc.isenabled(), before, gc.get_freeze_count() > before)
frozen = gc.get_freeze_count()
made_since = [[] for _ in range(100)]
import_frozen(["probe_library"])          # already imported: nothing more is frozen
print(gc.get_freeze_count() == frozen)
"""


def test_a_stage_process_imports_its_libraries_with_the_collector_paused_then_freezes_them(tmp_path):
    """The collector's full passes over GX's, Feast's, Evidently's or torch's objects were 10-20 % of
    a small stage's CPU; a fresh interpreter, as `towerflow stage` is."""
    (tmp_path / "probe_library.py").write_text("import gc\nCOLLECTOR_ON_AT_IMPORT = gc.isenabled()\n")
    out = subprocess.run([sys.executable, "-c", FREEZE_PROBE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "0", "True", "True"]


def test_the_stage_command_imports_the_stages_libraries_first(tmp_path, monkeypatch):
    import importlib.util

    import flows.environment
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.stages.registry import LIBRARIES, STAGES

    assert set(LIBRARIES) == set(STAGES)
    assert all(importlib.util.find_spec(name) for names in LIBRARIES.values() for name in names)
    asked: list[tuple[str, ...]] = []
    monkeypatch.setattr(flows.environment, "import_frozen", lambda names, _importers: asked.append(tuple(names)))
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["stage", "validate", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1 and "not found" in result.output     # nothing ingested in this project
    assert asked == [LIBRARIES["validate"]]


STAGE_LIBRARIES = """
import sys
from flows.environment import skip_type_instrumentation
skip_type_instrumentation()
from flows.stages.registry import import_stage_libraries

def loaded(*names):
    print(*(name in sys.modules for name in names))

import_stage_libraries("validate")
loaded("great_expectations", "pyspark", "sqlalchemy")
import_stage_libraries("materialize")
loaded("feast", "torch", "pyspark")
import torch, pyspark.sql, sqlalchemy
"""


def test_the_stage_processes_import_libraries_without_what_they_never_use(tmp_path):
    """As `towerflow stage validate` and `materialize` start (a fresh interpreter, one after the other
    to pay GX's import once): GX without pyspark and SQLAlchemy (0.6-0.9 s of CPU), Feast without
    torch (2.4 s), which no stage of theirs uses; all three stay importable."""
    # a script, not `python -c`: pyspark exits a `-c` program that imports it (tests/conftest.py)
    (tmp_path / "probe.py").write_text(STAGE_LIBRARIES)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(tmp_path / "probe.py")], capture_output=True, text=True,
                         timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "False", "True", "False", "False"]
