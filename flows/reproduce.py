"""One DVC stage of a run (or the run's push and cache cleanup), reproduced in a process of its own.

The flow's task starts `python -m flows.reproduce ROOT ACTION RESULT PARENT_PID [FLAGS]` (ACTION: a
stage name, with `--force` or `--restore`: put back the stage's outputs of its last successful run,
after it failed or was stopped; or `finish`, with `--push` and/or `--gc`) as the leader of a new
process group, waits at most run.stage_timeout_s and then stops the whole group: DVC, the stage
command it runs and whatever that started. A Prefect timeout cannot do
this (in a worker thread it cannot interrupt a blocking call: the stage would run on). This process
reads params.yaml's values from the run's params file (flows/run_params.py), passes that file to the
stage command, writes its outcome as JSON to RESULT, and ends its group if the run that started it
dies (a kill -9 of `towerflow run` leaves no stage running).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.durable import write_atomic
from flows.errors import BLOCKED_EXIT, STAGE_ERROR, TRANSIENT_EXIT
from flows.process_groups import still_running
from flows.run_params import ENV, RUN_PARAMS, dvc_reads_params_from

if TYPE_CHECKING:      # DVC is imported when a stage runs, not when this module loads
    from dvc.repo import Repo
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.hash_info import HashInfo


# What the run's fork server (flows/fork_server.py) imports once, so that each process it forks
# to reproduce a stage, put back outputs or finish the run does not: DVC's repo, reproduce, checkout,
# push and gc, what opening a repo and reading its dvc.yaml and dvc.lock import lazily (git through
# scmrepo/dulwich, the YAML and interpolation parsers), and this module
PRELOAD = ("flows.reproduce", "psutil", "yaml", "dvc.repo", "dvc.repo.reproduce", "dvc.repo.checkout",
           "dvc.repo.push", "dvc_data.hashfile.gc", "dvc.scm", "dvc.cachemgr", "dvc.data_cloud", "dvc.lock",
           "dvc.rwlock", "dvc.dirs", "dvc.repo.artifacts", "dvc.repo.datasets", "dvc.repo.metrics",
           "dvc.repo.params", "dvc.repo.plots", "dvc.repo.stage", "dvc.utils.strictyaml", "dvc_data.hashfile.db.local",
           "dulwich.worktree", "dulwich.ignore", "ruamel.yaml", "pyparsing", "configobj")


def _reproduce(name: str, force: bool) -> dict[str, Any]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logging.getLogger("dvc").propagate = False
    said = RUN_PARAMS.parent / f"{name}.error"      # the stage command's own one-line error, if it fails
    said.unlink(missing_ok=True)
    os.environ[STAGE_ERROR] = str(said.resolve())
    try:
        with Repo(".") as repo:
            repo.scm_context.quiet = True  # one "git add dvc.lock" hint at the end, not one per stage
            changed = repo.reproduce(targets=[name], single_item=True, force=force)
    except DvcException as exc:
        # DVC's message says which command exited with which code; the stage's own line says why
        cause = exc.__cause__ or exc
        why = said.read_text().strip() if said.is_file() else ""
        found = re.search(r"exited with (-?\d+)", str(cause))
        code = int(found.group(1)) if found else None
        return {"ok": False, "ran": False, "transient": code == TRANSIENT_EXIT, "blocked": code == BLOCKED_EXIT,
                "error": why or str(cause)}
    finally:
        said.unlink(missing_ok=True)
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


def _cache_files(folder: Path) -> dict[str, int]:
    """{path: bytes} of every file under `folder`."""
    return {str(Path(top) / name): (Path(top) / name).stat().st_size
            for top, _, names in os.walk(folder) for name in names}


# What a commit's DVC outputs are read from: a commit that changes none of these uses what its
# parent uses (git pathspecs, in every folder)
DVC_FILES = (":(glob)**/dvc.yaml", ":(glob)**/dvc.lock", ":(glob)**/*.dvc", ":(glob)**/params.yaml")


def _git(root: Path, *args: str) -> str | None:
    """git's output, or None when git cannot say (no git command: DVC reads repos without one)."""
    try:
        shown = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    return shown.stdout if shown.returncode == 0 else None


def versioned_revisions(root: Path) -> list[str] | None:
    """The commits, on any ref (branches, tags, `dvc exp` experiments, the stash), that changed a file
    DVC reads its outputs from and hold a dvc.lock or a .dvc file (without one a commit names no
    output): every other commit uses nothing, or what one of these uses. DVC's own
    `gc --all-commits` reads every commit's stages (0.3 s a commit on a 2-core machine: 90 s for a
    history of 300 commits), and a project's history is mostly code, or dvc.yaml and params.yaml
    edits before any run was committed (the demo's own: 127 of 639 commits, none with a dvc.lock).
    None when git cannot say: then every commit is read."""
    changed = _git(root, "log", "--all", "--full-history", "--format=%H", "--", *DVC_FILES)
    if changed is None:
        return None
    revisions = []
    for sha in changed.split():        # none in a repo with no commit yet
        names = _git(root, "ls-tree", "-r", "-z", "--name-only", sha)
        if names is None:
            return None
        if any(Path(name).name == "dvc.lock" or name.endswith(".dvc") for name in names.split("\0")):
            revisions.append(sha)
    return revisions


# dvc.lock as the last successful run left it (written by that run's finish): a run the gate stops
# keeps that run's outputs, the ones to go back to (DVC's run cache then restores train and rank in
# seconds instead of training them again)
LAST_SUCCESS = RUN_PARAMS.parent.parent / "last-success.lock"


def _lock_objects(lock: Path, odbs: dict[str, HashFileDB]) -> set[HashInfo]:
    """The cache objects the outputs `lock` (a dvc.lock) records use: each output's hash, and a
    directory's files. Nothing when the file is missing or unreadable; a directory whose listing is
    gone already adds only itself."""
    import yaml
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.errors import ObjectFormatError

    try:
        doc = yaml.safe_load(lock.read_text())
    except (OSError, yaml.YAMLError):
        return set()
    stages = doc.get("stages") if isinstance(doc, dict) else None
    found: set[HashInfo] = set()
    for stage in (stages or {}).values():
        for out in stage.get("outs") or []:
            if "md5" not in out:
                continue
            info = HashInfo("md5" if out.get("hash") == "md5" else "md5-dos2unix", out["md5"])
            found.add(info)
            if info.isdir and info.name in odbs:
                try:
                    found.update(entry for _, _, entry in Tree.load(odbs[info.name], info) if entry)
                except (OSError, ObjectFormatError):    # the listing is gone (collected) or unreadable
                    pass
    return found


def _collect_garbage() -> dict[str, Any]:
    """Remove from the project's DVC cache (run.keep_cache: versioned) the objects no version uses.
    Kept: the workspace's (dvc.lock: the run just made, and what a failed stage gets back), the last
    successful run's (LAST_SUCCESS: after a run the gate stopped) and those of every commit on any
    git ref (branches, tags, experiments), so any versioned run checks out again; what goes is the
    outputs of runs never committed and replaced since. This is
    `dvc gc --workspace --all-commits --all-experiments` with the commits that cannot add anything
    left out. A failure is reported, not raised: the run it follows has succeeded. A cache outside
    the project (cache.dir) may hold other projects' objects: never collected here."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo, lock_repo
    from dvc.scm import NoSCM
    from dvc_data.hashfile.db import get_index
    from dvc_data.hashfile.gc import gc

    # DVC warns of every output of a commit before the first run ("missing version info"): nothing
    # for a user to do; the run's log gets one line of what was removed
    logging.getLogger("dvc").setLevel(logging.ERROR)
    started = time.monotonic()
    with Repo(".") as repo:
        cache = Path(repo.cache.local_cache_dir).resolve()
        if not cache.is_relative_to(Path(repo.root_dir).resolve()):
            return {"skipped": f"the DVC cache {cache} is outside this project (cache.dir): other projects "
                               "may use it; collect it with `dvc gc --projects ...`"}
        before = _cache_files(cache)
        git = not isinstance(repo.scm, NoSCM)      # `dvc init --no-scm`: the workspace alone
        try:
            with lock_repo(repo):
                # the workspace always; revs resolves each commit once (a tag on one is not read twice)
                revs = versioned_revisions(Path(repo.root_dir)) if git else []
                used = repo.used_objs(revs=revs, all_commits=revs is None, all_branches=git, all_tags=git,
                                      all_experiments=git, force=True)
                odbs = {odb for _, odb in repo.cache.by_scheme() if odb}
                in_use = set().union(*used.values(), _lock_objects(LAST_SUCCESS, {o.hash_name: o for o in odbs}))
                for odb in odbs:
                    gc(odb, in_use)
                outcome = _change(before, _cache_files(cache))
                remote = _own_remote(repo)
                if remote is not None:      # the same for a remote folder of this project's own
                    before = _cache_files(Path(remote.path))
                    gc(remote, in_use)
                    get_index(remote).clear()       # DVC's record of what the remote holds
                    outcome["remote"] = _change(before, _cache_files(Path(remote.path)))
        except DvcException as exc:
            return {"error": str(exc.__cause__ or exc)}
    return {**outcome, "seconds": round(time.monotonic() - started, 1)}


def _own_remote(repo: Repo) -> HashFileDB | None:
    """The default remote's object store when it is a folder inside the project, as the demo's
    `dvc-remote/` is: only this project writes there. Any other remote (S3, a shared folder) may
    hold what other clones' commits, unknown here, use: never collected by a run."""
    from dvc_objects.fs.local import LocalFileSystem

    name = default_remote(Path(repo.root_dir))
    if name is None:
        return None
    odb = repo.cloud.get_remote_odb(name, "gc")
    inside = Path(odb.path).resolve().is_relative_to(Path(repo.root_dir).resolve())
    return odb if isinstance(odb.fs, LocalFileSystem) and inside else None


def _change(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    gone = before.keys() - after.keys()
    return {"removed": len(gone), "freed_bytes": sum(before[f] for f in gone), "kept_bytes": sum(after.values())}


def _finish(push: bool, gc: bool, succeeded: bool) -> dict[str, Any]:
    """At the end of a run: the push (a failure raises: the task retries it), then the cache's garbage
    collection (its outcome under "gc"). A successful run's dvc.lock is kept as LAST_SUCCESS first."""
    outcome = _push() if push else {"ok": True, "remote": None, "pushed": None}
    if succeeded and Path("dvc.lock").is_file():
        write_atomic(LAST_SUCCESS, Path("dvc.lock").read_bytes())
    if gc:
        outcome["gc"] = _collect_garbage()
    return outcome


def end_with_parent(parent: int) -> None:
    """Stop this process group when the process that started it is gone (ended, a zombie, or its pid
    taken by another process): a run's stage, or a scale bench's
    (flows/experiments/scale_bench.py), must not run on, unwatched. `parent` is the process that
    asked for this one, not always its parent: the run's fork server forks it (flows/fork_server.py)."""
    running = still_running(parent)

    def watch() -> None:
        while running():
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
        if action == "finish":
            outcome = _finish("--push" in argv[4:], "--gc" in argv[4:], "--succeeded" in argv[4:])
        elif "--restore" in argv[4:]:
            outcome = _restore(action)
        else:
            outcome = _reproduce(action, "--force" in argv[4:])
    result.write_text(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
