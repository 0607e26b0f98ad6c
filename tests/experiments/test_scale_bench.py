"""`towerflow bench --scale N`: generated data through the stages, one measured row per N in the json."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from flows.cli import app
from flows.experiments.scale_bench import markdown_table, merge_row, run_measured, tree_memory

ROOT = Path(__file__).resolve().parents[2]


def test_bench_scale_writes_a_row_per_stage(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)         # where the default --out (reports/bench_scale.json) would land
    out, kept = tmp_path / "bench_scale.json", tmp_path / "kept"
    args = ["bench", "--scale", "2000", "--until", "ingest", "--out", str(out), "--params", str(ROOT / "params.yaml"),
            "--keep", str(kept)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # --keep leaves the project copy, the generated source and the stage's log behind
    assert (kept / "project" / "params.yaml").is_file() and (kept / "ingest.log").is_file()
    assert (kept / "source" / "interactions.parquet").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "exists" in again.output      # never writes into an earlier bench
    doc = json.loads(out.read_text())
    row = doc["rows"][0]
    assert row["n"] == 2000 and row["data"]["users"] == 200 and row["data"]["items"] == 40
    assert row["data"]["ranking_logs"] > 0
    ingest = row["stages"]["ingest"]
    assert "error" not in ingest, ingest
    assert ingest["seconds"] > 0 and ingest["peak_rss_mb"] > 50 and ingest["peak_tree_rss_mb"] > 0
    assert 0 < ingest["peak_tree_pss_mb"] <= ingest["peak_tree_rss_mb"] * 1.05
    assert ingest["rows_per_s"] == round(2000 / ingest["seconds"], 1) and len(ingest["loadavg"]) == 6
    assert row["completed"] is False          # stopped after ingest: a partial row says so
    # the host's speed when the row started (rows of other sizes run hours apart), the CPU beside
    assert {"matmul_gflops", "copy_gb_s", "python_loop_s"} <= set(row["host_speed"])
    assert min(row["host_speed"][k] for k in ("matmul_gflops", "copy_gb_s", "python_loop_s")) > 0
    assert doc["machine"]["cpu"] and doc["machine"]["cpus"] >= 1

    # taken up again in the kept folder: the next stage, into the same row of the json the bench began
    # with (no --out given), with a setting added
    resume = ["bench", "--resume", str(kept), "--until", "validate",
              "--params", str(ROOT / "params.yaml"), "--set", "validate.max_null_share=0.2"]
    result = CliRunner().invoke(app, resume)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "reports").exists()
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and list(rows[0]["stages"]) == ["ingest", "validate"]
    assert rows[0]["stages"]["ingest"] == ingest and "error" not in rows[0]["stages"]["validate"]
    assert rows[0]["resumed"] == [{"from": "validate", "overrides": ["validate.max_null_share=0.2"],
                                   "code": rows[0]["code"]}]
    assert (kept / "validate.log").is_file()
    again = CliRunner().invoke(app, resume)
    assert again.exit_code == 1 and "nothing left" in again.output
    both = CliRunner().invoke(app, [*resume, "--scale", "2000"])
    assert both.exit_code == 1 and "--resume" in both.output
    stranger = CliRunner().invoke(app, ["bench", "--resume", str(tmp_path), "--out", str(out)])
    assert stranger.exit_code == 1 and "resume.json" in stranger.output


def test_peak_rss_covers_the_stage_process_tree(tmp_path: Path) -> None:
    """A process whose child holds 300 MB: both figures see it; a failing command keeps its exit code."""
    child = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); time.sleep(1.0)"
    parent = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {child!r}]) + 3)"
    fig = run_measured([sys.executable, "-c", parent], tmp_path, dict(os.environ), tmp_path / "log")
    assert fig["rc"] == 3
    assert fig["peak_rss_mb"] > 300 and fig["peak_tree_rss_mb"] > 300
    assert fig["seconds"] >= 1.0


def test_a_stage_ends_with_the_bench_that_started_it(tmp_path: Path) -> None:
    """The bench killed (-9: no handler of its own runs) while a stage runs: the stage and the process
    it started are stopped within seconds, not left running, unwatched."""
    marker = tmp_path / "pids"
    stage = (f"import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             f"open({str(marker)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}'); time.sleep(120)")
    bench = ("import os, sys; from pathlib import Path; from flows.experiments.scale_bench import run_measured; "
             f"run_measured([sys.executable, '-c', {stage!r}], Path({str(tmp_path)!r}), dict(os.environ), "
             f"Path({str(tmp_path / 'log')!r}))")
    proc = subprocess.Popen([sys.executable, "-c", bench], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (marker.is_file() and len(marker.read_text().split()) == 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the stage never started"
            time.sleep(0.1)
        pids = [int(p) for p in marker.read_text().split()]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"still running: {[p for p in pids if _alive(p)]}"
    finally:
        proc.kill()


def test_a_bench_stopped_with_sigterm_removes_its_project_and_stops_its_stage(tmp_path: Path) -> None:
    """`towerflow bench --scale` under SIGTERM (a `timeout`, a scheduler's stop): exit code 143, the
    running stage stopped and the temporary project (tens of GB at 10M) removed, not left in /tmp."""
    import psutil

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "bench", "--scale", "2000", "--out",
                             str(tmp_path / "bench.json"), "--params", str(ROOT / "params.yaml")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any("flows.cli stage" in " ".join(c.cmdline()) or "towerflow stage" in " ".join(c.cmdline())
                      for c in psutil.Process(proc.pid).children(recursive=True)):
            assert proc.poll() is None and time.monotonic() < deadline, "no stage started"
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert list(tmp.glob("towerflow-scale-2000-*")), "no temporary project"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not alive, f"left running: {[' '.join(p.cmdline())[:100] for p in alive]}"
    assert not list(tmp.glob("towerflow-scale-2000-*")), "the temporary project was left behind"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:    # a zombie (ended, not yet reaped by init) is as good as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stage_is_not_charged_the_benchs_own_memory(tmp_path: Path) -> None:
    """The bench process holds the generated data (here 600 MB); a stage's figures are its own."""
    held = np.ones(600 * 2**20 // 8)
    fig = run_measured([sys.executable, "-c", "pass"], tmp_path, dict(os.environ), tmp_path / "log")
    assert held.sum() > 0 and fig["rc"] == 0
    assert fig["peak_rss_mb"] < 100 and fig["peak_tree_rss_mb"] < 100


def test_bad_overrides_stop_before_generating(tmp_path: Path) -> None:
    out = tmp_path / "bench_scale.json"
    result = CliRunner().invoke(app, ["bench", "--scale", "1000", "--out", str(out),
                                      "--params", str(ROOT / "params.yaml"), "--set", "data.max_users=0"])
    assert result.exit_code == 1 and "data.max_users" in result.output
    assert not out.exists()


def test_rows_merge_by_n(tmp_path: Path) -> None:
    out = tmp_path / "bench_scale.json"
    merge_row(out, {"n": 1000, "total_seconds": 1.0})
    merge_row(out, {"n": 100, "total_seconds": 2.0})
    merge_row(out, {"n": 1000, "total_seconds": 3.0})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["total_seconds"]) for r in rows] == [(100, 2.0), (1000, 3.0)]


def test_table_gives_the_exponent_between_the_two_largest_n() -> None:
    stage = lambda s: {"seconds": s, "peak_tree_rss_mb": 100.0}  # noqa: E731
    doc = {"rows": [{"n": 10, "stages": {"train": stage(1.0), "rank": stage(1.0)}},
                    {"n": 100, "stages": {"train": stage(10.0), "rank": stage(1.0)}},
                    {"n": 1000, "stages": {"train": stage(1000.0), "rank": {**stage(5.0), "error": "x"}}}]}
    lines = markdown_table(doc).splitlines()
    assert lines[2].startswith("| train |") and lines[2].endswith("| 2.00 |")     # 10 s -> 1000 s over 10x
    assert "failed" in lines[3] and lines[3].endswith("| 0.00 |")                 # the two largest that ran


SHARING = """
import os, sys, time
import numpy as np
block = np.ones(300 * 2**20 // 8)          # 300 MB, every page touched
if os.fork() == 0:                          # the child inherits it, shared until written
    time.sleep(30); os._exit(0)
print("ready", flush=True); time.sleep(30)
"""


def test_tree_memory_counts_pages_a_forked_child_shares_once() -> None:
    """The bench's tree PSS: a parent and a forked child sharing 300 MB hold 300 MB, where their summed
    RSS says 600 (the rank stage's forked fits; flows/experiments/scale_bench.py tree_memory)."""
    proc = subprocess.Popen([sys.executable, "-c", SHARING], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        rss, pss = tree_memory(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    mb = 2**20
    assert rss > 600 * mb and 300 * mb < pss < rss - 250 * mb
