"""One DVC stage (or the push) of a run, reproduced in a process of its own.

The flow's task starts `python -m flows.reproduce ROOT ACTION RESULT PARENT_PID [--force]` (ACTION: a
stage name, or `push`) as the leader of a new process group, waits at most run.stage_timeout_s and then stops the
whole group: DVC, the stage command it runs and whatever that started. A Prefect timeout cannot do
this (in a worker thread it cannot interrupt a blocking call: the stage would run on). This process
reads params.yaml's values from the run's params file (flows/run_params.py), passes that file to the
stage command, writes its outcome as JSON to RESULT, and ends its group if the run that started it
dies (a kill -9 of `towerflow run` leaves no stage running).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flows.errors import TRANSIENT_EXIT
from flows.run_params import ENV, RUN_PARAMS, dvc_reads_params_from


def _reproduce(name: str, force: bool) -> dict[str, Any]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logging.getLogger("dvc").propagate = False
    try:
        with Repo(".") as repo:
            repo.scm_context.quiet = True  # one "git add dvc.lock" hint at the end, not one per stage
            changed = repo.reproduce(targets=[name], single_item=True, force=force)
    except DvcException as exc:
        # The stage printed its own one-line error; DVC's message says which stage and command.
        cause = exc.__cause__ or exc
        return {"ok": False, "ran": False, "transient": f"exited with {TRANSIENT_EXIT}" in str(cause),
                "error": str(cause)}
    return {"ok": True, "ran": bool(changed)}


def _push() -> dict[str, Any]:
    """Push the outputs to the default DVC remote when one is set (so any run can be restored
    elsewhere with `dvc pull`)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        remote = repo.config["core"].get("remote")
        return {"ok": True, "remote": remote, "pushed": repo.push() if remote else None}


def end_with_parent(parent: int) -> None:
    """Stop this process group when the process that started it is gone (reparented): a run's stage,
    or a scale bench's (flows/experiments/scale_bench.py), must not run on, unwatched."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        if os.getpgid(0) == os.getpid():     # the leader of its own group, as the flow starts it
            os.killpg(os.getpid(), signal.SIGTERM)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    root, action, result, parent = Path(argv[0]), argv[1], Path(argv[2]), int(argv[3])
    end_with_parent(parent)
    os.chdir(root)   # DVC resolves targets and stage paths against the working directory
    run_file = root / RUN_PARAMS
    os.environ[ENV] = str(run_file)      # inherited by the stage command DVC starts
    with dvc_reads_params_from(root / "params.yaml", run_file):
        outcome = _push() if action == "push" else _reproduce(action, "--force" in argv[4:])
    result.write_text(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
