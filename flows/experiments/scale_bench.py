"""`towerflow bench --scale N` (`make bench-scale N=...`): the whole pipeline on N generated interactions.

Generates contract data of N interactions (flows/sources/shapes.py `scaled`: Zipf item popularity,
heavy-tailed user activity, multi-valued item features, string ids, ranking logs; users N/10 and
items N/50 unless given) and runs every stage on it in a temporary copy of the project, each stage
as its own process (`towerflow stage NAME`, as dvc.yaml runs it), so that each gets its own figures:

- wall seconds, and interactions per second (N / seconds: how fast the stage gets through the data);
- peak RSS of the largest process of the stage (the kernel's ru_maxrss of the reaped child, which
  covers its own children) and of the stage's whole process tree (summed RSS and summed PSS, sampled
  every 0.2 s: PSS counts the pages forked workers share with their parent once);
- the load average when the stage starts and ends (the machine is shared: read timings beside it).

A stage that fails is recorded with its last error line, and the stages after it are not run. The
gate is forced (reason recorded): the bench times publishing, whatever the gate says of a model of
random data; the gate's verdict is kept in the row. Results are merged into a JSON file (default
reports/bench_scale.json), one row per N: a new run of the same N replaces its row.

A run in a --keep folder can be stopped (`--until STAGE`) and taken up again later (`--resume DIR`):
the stages after the last one that passed run in the same project copy, into the same row. At 10M a
whole run takes hours on 2 cores; this measures it in parts.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from flows.experiments.bench import copy_project
from flows.experiments.machine import host_speed, machine
from flows.process_groups import stop_group
from flows.sources.shapes import generate_topics, scaled, write_source

POLL_S = 0.2
CODE_FOLDERS = ("flows", "features", "models", "validation")   # what a resumed bench takes from the checkout
RESUME_FILE = "resume.json"     # in a --keep folder: the row so far, the stages' --set arguments, the json
DEFAULT_OUT = Path("reports/bench_scale.json")   # where the rows go without --out
GATE_FORCE = ["gate.force=true", "gate.force_reason=scale bench - times every stage, publishing included"]


def tree_memory(proc: Any) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of a process (a psutil.Process or a pid) and its descendants;
    processes that end meanwhile count 0. A forked worker's RSS counts every page it still shares with
    its parent (the rank stage's fits: 4.4 GB summed RSS at 4M where the tree held 3.3 GB); PSS
    divides each shared page among the processes that map it, so its sum is what the tree holds."""
    import psutil

    rss = pss = 0
    try:
        proc = psutil.Process(proc) if isinstance(proc, int) else proc
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            full = p.memory_full_info()      # /proc/PID/smaps_rollup: PSS beside RSS
            rss, pss = rss + full.rss, pss + full.pss
        except psutil.AccessDenied:         # no smaps (another user's process): RSS for both
            try:
                alone = p.memory_info().rss
            except psutil.Error:
                continue
            rss, pss = rss + alone, pss + alone
        except psutil.Error:
            pass
    return rss, pss


def tree_rss(proc: Any) -> int:
    """Summed RSS (bytes) of a process and its descendants (tree_memory's first figure)."""
    return tree_memory(proc)[0]


# Runs a command and writes its exit code and ru_maxrss (kB) to a file. Started fresh (exec'd), so its
# own memory is a Python interpreter's: a child's ru_maxrss starts at the peak RSS of the process it
# was forked from (Linux carries the parent's high-water mark through fork and exec), and the bench
# process, which generated the data, was gigabytes at 10M (every stage's figure read at least that).
# It leads a process group of its own and ends the group (the stage and all it started) once the
# bench that started it is gone, as a run's stage process does (flows.reproduce.end_with_parent): a
# bench stopped with SIGTERM or kill -9 leaves no 10M stage running on for an hour, unwatched.
MAXRSS_WRAPPER = """
import json, os, subprocess, sys
from flows.reproduce import end_with_parent
end_with_parent(os.getppid())
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
rc = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as out:
    json.dump({"rc": rc, "maxrss_kb": usage.ru_maxrss}, out)
sys.exit(rc if rc >= 0 else 128 - rc)
"""


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run cmd to its end: {"seconds", "peak_rss_mb" (largest process), "peak_tree_rss_mb",
    "peak_tree_pss_mb", "rc"}.

    peak_rss_mb is the kernel's ru_maxrss of cmd's process, which covers its own children, read by a
    fresh wrapper process (MAXRSS_WRAPPER); peak_tree_rss_mb and peak_tree_pss_mb are the summed RSS
    and PSS of the whole tree, sampled every POLL_S (the wrapper's ~10 MB included): the same for one
    process, PSS the lower where processes share pages (tree_memory)."""
    import psutil

    peak = [0, 0]
    figures = log_path.with_suffix(".maxrss.json")
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-I", "-c", MAXRSS_WRAPPER, str(figures), *cmd], cwd=cwd,
                                 env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        done = threading.Event()

        def poll() -> None:
            proc = psutil.Process(child.pid)
            while not done.is_set():
                rss, pss = tree_memory(proc)
                peak[:] = [max(peak[0], rss), max(peak[1], pss)]
                done.wait(POLL_S)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            child.wait()
        finally:    # also when the bench is stopped (SIGTERM, Ctrl-C): before its project is removed
            stop_group(child)
        seconds = time.perf_counter() - t0
        done.set()
        watcher.join()
    if not figures.is_file():      # the wrapper itself failed: its error is in the log
        raise RuntimeError(f"measuring {cmd[:4]} failed: {_last_error(log_path)}")
    measured = json.loads(figures.read_text())
    return {"seconds": round(seconds, 2), "rc": measured["rc"],
            "peak_rss_mb": round(measured["maxrss_kb"] / 1024, 1),     # Linux: kilobytes
            "peak_tree_rss_mb": round(peak[0] / 2**20, 1), "peak_tree_pss_mb": round(peak[1] / 2**20, 1)}


def _commit(root: Path) -> str | None:
    """The code measured: the checkout's commit, '+changes' when it has uncommitted ones (None: no git)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def _last_error(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:600] if lines else ""


def _stage_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the copy's code, not an installed one: the stage runs what this checkout holds
    env["PYTHONPATH"] = os.pathsep.join([str(work), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("TOWERFLOW_RUN_PARAMS", None)
    return env


def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def scale_run(root: Path, n: int, overrides: list[str], users: int | None = None, items: int | None = None,
              seed: int = 0, stages: tuple[str, ...] | None = None, log: Callable[[str], None] = print,
              progress: Callable[[dict[str, Any]], None] | None = None, keep: Path | None = None,
              out: Path | None = None, log_requests: float = 0.02) -> dict[str, Any]:
    """One row: the data's shape, then per stage its figures (see the module docstring). progress
    gets the row so far after each stage (a run stopped halfway keeps what it measured). keep: a new
    folder to build in and leave behind (the project copy, the source, each stage's log), which records
    `out` (the json the row goes into) for a later `--resume`."""
    from flows.params import load_params
    from flows.stages.registry import STAGES

    load_params(root / "params.yaml", overrides)    # a bad --set fails here, not in every stage
    shape = scaled(n, users, items, log_requests)
    with _workspace(n, keep) as tmp:
        work = Path(tmp) / "project"
        work.mkdir()
        copy_project(root, work)
        cache = work / ".cache/towerflow"
        cache.mkdir(parents=True)
        vendor = root / ".cache/towerflow/vendor"
        if vendor.is_dir():     # the workspace's vendored report assets: no download per bench
            (cache / "vendor").symlink_to(vendor.resolve())
        t0 = time.perf_counter()
        users_df, items_df, inter, logs = generate_topics(shape, seed)
        source = write_source(users_df, items_df, inter, logs, Path(tmp) / "source")
        data = {"interactions": len(inter), "users": len(users_df), "items": len(items_df),
                "ranking_logs": 0 if logs is None else len(logs),
                "generate_seconds": round(time.perf_counter() - t0, 2)}
        del users_df, items_df, inter, logs
        log(f"scale {n}: generated {json.dumps(data)}")
        base = [f"data.source={source}", "paths.cache=.cache/towerflow", *GATE_FORCE, *overrides]
        row: dict[str, Any] = {"n": n, "data": data, "overrides": overrides, "code": _commit(root), "stages": {}}
        resume_file = (out or DEFAULT_OUT) if keep is not None else None
        return _run_stages(Path(tmp), row, base, stages or STAGES, log, progress, resume_file)


def _run_stages(tmp: Path, row: dict[str, Any], base: list[str], names: Sequence[str],
                log: Callable[[str], None], progress: Callable[[dict[str, Any]], None] | None,
                resume_out: Path | None) -> dict[str, Any]:
    """Run `names` in tmp/project with the --set arguments `base`, each stage's figures into row.
    resume_out (a kept bench): the row, base and this json file are also kept in tmp/RESUME_FILE
    after each stage (`--resume`, which writes into the same file unless given another)."""
    from flows.stages.registry import STAGES

    n, work = row["n"], tmp / "project"
    env = _stage_env(work)
    for name in names:
        load_start = os.getloadavg()
        log_path = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "flows.cli", "stage", name, "--params", str(work / "params.yaml"),
               *_set_args(base)]
        fig = run_measured(cmd, work, env, log_path)
        fig["rows_per_s"] = round(n / max(fig["seconds"], 1e-9), 1)
        fig["loadavg"] = [round(x, 2) for x in (*load_start, *os.getloadavg())]
        ok = fig.pop("rc") == 0
        if not ok:
            fig["error"] = _last_error(log_path)
        row["stages"][name] = fig
        log(f"scale {n}: {name:<12} {json.dumps(fig)}")
        if resume_out is not None:
            state = {"row": row, "base": base, "out": str(resume_out.resolve())}
            (tmp / RESUME_FILE).write_text(json.dumps(state, indent=2, default=str) + "\n")
        if progress is not None:
            progress({**row, "completed": False})
        if not ok:
            break
    row["total_seconds"] = round(sum(s["seconds"] for s in row["stages"].values()), 2)
    row["completed"] = all("error" not in s for s in row["stages"].values()) and \
        len(row["stages"]) == len(STAGES)
    # what the largest stage held: its tree's PSS (rows before it was measured: the summed RSS)
    row["peak_rss_mb"] = max((_tree_mb(s) for s in row["stages"].values()), default=0.0)
    row["notes"] = _notes(work)
    return row


def resume_out(kept: Path) -> Path | None:
    """The json file a kept bench was writing into (None: not recorded, or not a kept bench)."""
    state_file = kept / RESUME_FILE
    if not state_file.is_file():
        return None
    recorded = json.loads(state_file.read_text()).get("out")
    return Path(recorded) if recorded else None


def scale_resume(root: Path, kept: Path, overrides: list[str], out: Path, until: str | None = None,
                 log: Callable[[str], None] = print,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Go on with a bench kept by `--keep` (stopped by `--until`, or by a failed stage, which is run
    again): the stages after the last one that passed, up to `until`, in the kept project with the
    code of `root` (its code folders copied over the kept ones; the kept params.yaml stays) and
    `overrides` added to the --set arguments; the row records each part's start, settings and commit
    (`resumed`). A 10M run can be measured in parts this way, each part as long as one sitting allows."""
    from flows.params import load_params
    from flows.stages.registry import STAGES

    state_file = kept / RESUME_FILE
    if not state_file.is_file():
        raise ValueError(f"--resume {kept}: no {RESUME_FILE} there; resume a folder made by "
                         "`towerflow bench --scale N --keep DIR`")
    load_params(kept / "project" / "params.yaml", overrides)      # a bad --set fails before any stage
    state = json.loads(state_file.read_text())
    row, base = state["row"], state["base"]
    row["stages"] = {k: v for k, v in row["stages"].items() if "error" not in v}
    done = [name for name in STAGES if name in row["stages"]]
    last = STAGES.index(done[-1]) + 1 if done else 0
    end = STAGES.index(until) + 1 if until else len(STAGES)
    names = STAGES[last:end]
    if not names:
        raise ValueError(f"--resume {kept}: nothing left to run (done: {', '.join(done) or 'none'})")
    for name in CODE_FOLDERS:
        shutil.rmtree(kept / "project" / name, ignore_errors=True)
        shutil.copytree(root / name, kept / "project" / name)
    row["resumed"] = [*row.get("resumed", []), {"from": names[0], "overrides": overrides, "code": _commit(root)}]
    return _run_stages(kept.resolve(), row, [*base, *overrides], names, log, progress, out)


@contextlib.contextmanager
def _workspace(n: int, keep: Path | None) -> Iterator[str]:
    """A temporary folder, or `keep` (which must not exist yet: a bench never writes into old results)."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix=f"towerflow-scale-{n}-") as tmp:
            yield tmp
        return
    if keep.exists():
        raise ValueError(f"--keep {keep}: the folder exists; give a new one")
    keep.mkdir(parents=True)
    yield str(keep.resolve())


def _notes(work: Path) -> dict[str, Any]:
    """What the stages skipped or capped at this size, read from their own outputs."""
    out: dict[str, Any] = {}
    metrics = work / "reports" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        out["ease"] = m.get("ease", {}).get("skipped", "computed")
        out["ndcg@20"] = {k: v.get("ndcg@20") for k, v in m.items() if isinstance(v, dict) and "ndcg@20" in v}
    quality = work / "reports" / "quality" / "quality.json"
    if quality.is_file():
        q = json.loads(quality.read_text())
        out["quality_report"] = {k: q[k] for k in ("note", "not_computed", "diversity_items") if k in q}
    gate = work / "reports" / "gate.json"
    if gate.is_file():
        g = json.loads(gate.read_text())
        out["gate"] = {k: g[k] for k in ("passed", "forced", "reasons") if k in g}
    return out


def merge_row(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Put row into out's rows (replacing the row of the same n), sorted by n."""
    doc = json.loads(out.read_text()) if out.is_file() else {}
    rows = [r for r in doc.get("rows", []) if r.get("n") != row["n"]]
    doc = {"machine": machine(speed=False),
           "rows": sorted([*rows, row], key=lambda r: r["n"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def scale_bench(root: Path, out: Path, n: int, overrides: list[str], users: int | None = None,
                items: int | None = None, stages: list[str] | None = None,
                log: Callable[[str], None] = print, keep: Path | None = None,
                resume: Path | None = None, until: str | None = None,
                log_requests: float = 0.02) -> dict[str, Any]:
    """stages: the first ones only (a partial row says so: completed is false). resume: a kept folder
    to go on with (n, users, items and stages are then its own; until bounds the stages run)."""
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    host = host_speed()                  # each row's host speed at its start (rows run hours apart)
    progress = lambda partial: merge_row(out, {**partial, "date": date, "host_speed": host})  # noqa: E731
    if resume is not None:
        row = scale_resume(root, resume, overrides, out, until, log, progress)
    else:
        row = scale_run(root, n, overrides, users, items, stages=tuple(stages) if stages else None, log=log,
                        progress=progress, keep=keep, out=out, log_requests=log_requests)
    row["date"], row["host_speed"] = date, host
    merge_row(out, row)
    return row


def _tree_mb(stage: dict[str, Any]) -> float:
    """A stage's peak tree memory: PSS, or the summed RSS of rows measured before PSS was."""
    return stage.get("peak_tree_pss_mb", stage["peak_tree_rss_mb"])


def markdown_table(doc: dict[str, Any]) -> str:
    """Seconds and peak tree RSS (MB) per stage and N, and the exponent b of seconds ∝ N^b between the
    two largest N that ran the stage (1: linear; > 1: superlinear), for the README."""
    rows = [r for r in doc.get("rows", []) if r.get("stages")]
    if not rows:
        return ""
    names = list(dict.fromkeys(name for r in rows for name in r["stages"]))
    head = "| stage | " + " | ".join(f"N={r['n']:,}: s / MB" for r in rows) + " | exponent |"
    lines = [head, "|" + "---|" * (len(rows) + 2)]
    for name in names:
        cells = [f"{r['stages'][name]['seconds']:g} / {_tree_mb(r['stages'][name]):.0f}"
                 if name in r["stages"] and "error" not in r["stages"][name] else
                 ("failed" if name in r["stages"] else "") for r in rows]
        ran = [r for r in rows if name in r["stages"] and "error" not in r["stages"][name]]
        exponent = ""
        if len(ran) >= 2:
            a, b = ran[-2], ran[-1]
            exponent = f"{math.log(b['stages'][name]['seconds'] / a['stages'][name]['seconds']) / math.log(b['n'] / a['n']):.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {exponent} |")
    return "\n".join(lines)
