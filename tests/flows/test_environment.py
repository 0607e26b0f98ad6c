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
