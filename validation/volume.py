"""Volume checks: each table's row count within `validate.volume_factor` of the last validated run.

The counts of the last run that passed (warnings allowed) are kept in `<context_root>/volume.json`,
next to the GX context and outside git and DVC: they describe the history of this project's runs,
not one version of the data. A table with no previous count (or a previous count of 0) is not bounded.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from validation.params import ValidateParams
from validation.runner import Check
from validation.suites import Expect

STATE = "volume.json"
SUITE = "volume"


def load_previous(context_root: Path) -> dict[str, int]:
    path = context_root / STATE
    if not path.exists():
        return {}
    try:
        return {k: int(v) for k, v in json.loads(path.read_text()).get("rows", {}).items()}
    except (ValueError, AttributeError):  # a hand-edited or truncated file: start over, say so in docs
        return {}


def save_counts(context_root: Path, counts: dict[str, int]) -> None:
    """Merge this run's counts into the state (the training set and the contract tables are saved
    by different stages)."""
    path = context_root / STATE
    rows = {**load_previous(context_root), **counts}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "updated": datetime.now(timezone.utc).isoformat()},
                              indent=2) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a file


def volume_suite(tables: list[str]) -> list:
    """One expectation per table on a one-row frame of counts (see `volume_frame`)."""
    e = Expect()
    return [e("ExpectColumnValuesToBeBetween", None, "volume",
              "row count outside {factor}x of the previous validated run ({" + t + "_previous} rows)",
              column=t, min_value={"$PARAMETER": f"{t}_min_rows"}, max_value={"$PARAMETER": f"{t}_max_rows"},
              meta={"table": t, "template": True, "scalar": True})
            for t in tables]


def volume_frame(counts: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame({t: [n] for t, n in counts.items()})


def volume_check(counts: dict[str, int]) -> Check:
    """The volume suite of these tables, run on their one-row frame of counts."""
    return Check(SUITE, SUITE, volume_suite(list(counts)), lambda: [volume_frame(counts)])


def volume_parameters(previous: dict[str, int], tables: list[str],
                      validate_cfg: ValidateParams) -> dict[str, Any]:
    out: dict[str, Any] = {"factor": validate_cfg.volume_factor}
    for t in tables:
        prev = previous.get(t, 0)
        out[f"{t}_previous"] = prev if prev else "none"
        out[f"{t}_min_rows"] = prev / validate_cfg.volume_factor if prev else 0
        out[f"{t}_max_rows"] = prev * validate_cfg.volume_factor if prev else None
    return out
