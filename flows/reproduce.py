"""One DVC stage (or the push) of a run, reproduced in a process of its own.

The flow's task starts `python -m flows.reproduce ROOT ACTION RESULT PARENT_PID [--force | --restore]`
(ACTION: a stage name, or `push`; `--restore`: put back the stage's outputs of its last successful run,
after it failed or was stopped) as the leader of a new process group, waits at most run.stage_timeout_s and then stops the
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


def _restore(name: str) -> dict[str, Any]:
    """Put back, from the DVC cache, the outputs dvc.lock records for stage `name` (its last successful
    run): DVC deletes a stage's outputs before it runs the stage, so one that failed, ran past its time
    or was stopped left them missing (a stopped rank stage: no ranker to score with until the next
    run). Outputs kept out of the cache (`cache: false`: the gate's verdict, also written when it
    blocks) stay as the stage left them, and so do `persist` ones. Nothing to put back before the
    stage's first success."""
    import yaml
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    lock = Path("dvc.lock")
    locked = yaml.safe_load(lock.read_text()) if lock.is_file() else None
    if name not in ((locked or {}).get("stages") or {}):
        return {"ok": True, "restored": []}
    logging.getLogger("dvc").propagate = False
    try:
        with Repo(".") as repo:
            # `persist` outputs are not deleted before a run, and may have moved on since dvc.lock
            # (the online store takes the service's pushed events): they are never put back
            outs = [o.def_path for o in repo.stage.collect(name)[0].outs if o.use_cache and not o.persist]
            done = repo.checkout(targets=outs, force=True) if outs else {"added": [], "modified": []}
    except DvcException as exc:       # e.g. the cache no longer holds them (dvc gc)
        return {"ok": False, "error": str(exc.__cause__ or exc)}
    return {"ok": True, "restored": sorted(done["added"] + done["modified"])}


def default_remote(root: Path) -> str | None:
    """The DVC remote `dvc push` would push to (core.remote, from every level DVC reads: system,
    global, the repo's config and config.local), or None. DVC's own config reader: local files only,
    nothing that can hang, so the flow's process asks it before starting a push process."""
    from dvc.config import Config

    return Config(dvc_dir=root / ".dvc")["core"].get("remote")


def _push() -> dict[str, Any]:
    """Push the outputs to the default DVC remote when one is set (so any run can be restored
    elsewhere with `dvc pull`)."""
    remote = default_remote(Path("."))
    if remote is None:
        return {"ok": True, "remote": None, "pushed": None}
    from dvc.repo import Repo

    with Repo(".") as repo:
        return {"ok": True, "remote": remote, "pushed": repo.push()}


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
        if action == "push":
            outcome = _push()
        elif "--restore" in argv[4:]:
            outcome = _restore(action)
        else:
            outcome = _reproduce(action, "--force" in argv[4:])
    result.write_text(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
