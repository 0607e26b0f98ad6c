"""Run a snippet in a fresh interpreter, as a command runs, and see which modules it imported.

What a process imports is what its start-up costs (torch 1.1-1.5 s, Feast 1 s, the params models
0.3 s): tests of "this command does not import X" must not run in the test process, where X is
long imported.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "modules imported: "


def modules_imported(code: str, watched: tuple[str, ...], torch_importable_after: bool = False,
                     timeout: int = 300) -> tuple[list[str], str]:
    """(the sorted names of `watched` that `code` left imported, its stdout). The snippet must exit 0.
    torch_importable_after: then also check that torch still imports and runs (a process that
    imported Feast with torch hidden must not have broken torch for later use)."""
    tail = f"\nimport sys as _sys, json as _json\nprint({MARK!r} + _json.dumps(sorted(m for m in {watched!r} if m in _sys.modules)))\n"
    if torch_importable_after:
        tail += "import torch as _torch\nassert _torch.ones(1).item() == 1.0\n"
    out = subprocess.run([sys.executable, "-c", code + tail], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in reversed(out.stdout.splitlines()) if line.startswith(MARK))
    return json.loads(line[len(MARK):]), out.stdout
