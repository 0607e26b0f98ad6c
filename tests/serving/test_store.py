"""The bundle store as its one owner keeps it: LIVE only ever moves to a version whose file digests
match, a rollback brings back that version's own ranker, and kill -9 of each writer of the store
(publish's LIVE switch, a rollback, a prune, an item addition) leaves it readable with LIVE on a
complete, verified version and nothing published lost.

Writers run in real subprocesses, paused at a named step by TOWERFLOW_TEST_PAUSE_AT
(flows.durable.pause_point) and SIGKILLed there; nothing is mocked.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.errors import PublishError
from flows.params import PublishParams
from flows.serving.bundles import open_store, rollback
from flows.serving.store import ADDED_DIR, BundleStore, read_additions
from flows.stages.publish import publish

ROOT = Path(__file__).resolve().parents[2]
CFG = {"verify_users": 20, "upsert_batch": 20}
PUBLISH = """
import json, sys
from pathlib import Path
from flows.params import PublishParams
from flows.stages.publish import publish
root, model, cfg, ranker = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
publish(root / "artifacts/model" / model, root / "data/training", root / "data/ingested/schema.json",
        PublishParams(**cfg), root / "artifacts/published", ranker_dir=Path(ranker) if ranker else None)
"""
ROLLBACK = """
import sys
from pathlib import Path
from flows.serving.bundles import open_store, rollback
rollback(open_store(Path(sys.argv[1]) / "artifacts/published"), reason="kill test")
"""
ADD = """
import sys
from pathlib import Path
import numpy as np, pandas as pd, pyarrow as pa
from flows.serving.store import BundleStore, write_additions
store = BundleStore(Path(sys.argv[1]) / "artifacts/published")
bundle = store.live_dir()
for i in range(10**6):
    vector = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 8)
    table = pa.table({"item_id": [10**6 + i], "vector": vector})
    with store.additions_locked():
        write_additions(bundle, f"{i:09d}", table)
    print(f"added {10**6 + i}", flush=True)
"""


def _publish(root: Path, model: str = "full", ranker: Path | None = None, **cfg) -> dict:
    return publish(root / "artifacts/model" / model, root / "data/training", root / "data/ingested/schema.json",
                   PublishParams(**CFG, **cfg), root / "artifacts/published", ranker_dir=ranker)


def _ranker(root: Path, name: str) -> Path:
    """A ranker folder as the rank stage leaves it (here: the stage's 'skipped' record, named)."""
    folder = root / "rankers" / name
    folder.mkdir(parents=True)
    (folder / "ranker.json").write_text(json.dumps({"skipped": f"ranker {name}"}) + "\n")
    return folder


def _spawn(script: str, *args: str, pause: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOWERFLOW_TEST_PAUSE_S="300")
    if pause:
        env["TOWERFLOW_TEST_PAUSE_AT"] = pause
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, wanted: str, timeout: float = 120) -> list[str]:
    """Read the child's lines until one starts with `wanted`, then SIGKILL it; returns the lines."""
    lines: list[str] = []
    timer = threading.Timer(timeout, proc.kill)     # a child that never says it: killed, readline ends
    timer.start()
    try:
        while True:
            line = proc.stdout.readline()
            assert line, f"no '{wanted}' from the child: {proc.stderr.read()}"
            lines.append(line.strip())
            if line.startswith(wanted):
                return lines
    finally:
        timer.cancel()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()    # reaped: its pid is no longer alive for the next cleanup


def _assert_sound(store: BundleStore, live: str) -> None:
    """Readable, LIVE on a complete version whose digests match, only complete versions listed."""
    assert store.live() == live and live in store.complete()
    store.verify(live)
    assert all(not v.startswith(".") for v in store.complete())


def test_rollback_refuses_a_damaged_bundle_and_live_stays(project: Path) -> None:
    store = open_store(project / "artifacts/published")
    first = _publish(project)["version"]
    second = _publish(project, model="eval")["version"]
    assert set(store.meta(first)["files"]) >= {"model/model.pt", "items.parquet", "item_vectors.parquet"}
    vectors = store.version_dir(first) / "item_vectors.parquet"
    good = vectors.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF                     # one flipped byte: a bad disk, a bad copy
    vectors.write_bytes(bytes(data))
    with pytest.raises(PublishError, match="item_vectors.parquet differs from the published file"):
        rollback(store, reason="bad ctr")
    assert store.live() == second and [e["action"] for e in store.history()] == ["publish", "publish"]
    vectors.write_bytes(good)
    (store.model_dir(first) / "model.pt").unlink()
    with pytest.raises(PublishError, match="model/model.pt is missing"):
        rollback(store, to=first)
    assert store.live() == second


def test_rollback_brings_back_the_ranker_published_with_the_version(project: Path) -> None:
    from flows.serving.http_errors import status_of
    from flows.serving.rerank import NoRanker, RankerCache

    store = open_store(project / "artifacts/published")
    stage_out = _ranker(project, "a")
    first = _publish(project, ranker=stage_out)["version"]
    (stage_out / "ranker.json").write_text(json.dumps({"skipped": "ranker b"}) + "\n")   # the rank stage reruns
    assert json.loads((store.ranker_dir(first) / "ranker.json").read_text())["skipped"] == "ranker a"
    second = _publish(project, ranker=stage_out)
    assert second["action"] == "built", "a new ranker is new content, even with the same model"
    assert json.loads((store.ranker_dir(second["version"]) / "ranker.json").read_text())["skipped"] == "ranker b"
    rollback(store)
    assert store.live() == first
    assert json.loads((store.ranker_dir(store.live()) / "ranker.json").read_text())["skipped"] == "ranker a"
    # the service serves the live version's own ranker: here one that trained none, which no retry
    # changes (a 422 naming why, not a 503)
    with pytest.raises(NoRanker, match=r"has no ranker: .*no ranker was trained \(ranker a\)") as refused:
        RankerCache(store.root).get(store.live())
    assert status_of(refused.value) == 422


def test_kill_during_prune_leaves_no_half_version_and_the_next_publish_removes_it(project: Path) -> None:
    store = BundleStore(project / "artifacts/published")
    old = _publish(project, ranker=_ranker(project, "a"))["version"]
    live = _publish(project, model="eval")["version"]
    proc = _spawn(PUBLISH, str(project), "full", json.dumps({**CFG, "keep_versions": 2}), "", pause="prune")
    _kill_when(proc, "paused at prune")
    deleting = [p.name for p in store.versions.glob(".deleting-*")]
    assert deleting == [f".deleting-{old}-{proc.pid}"]
    new = store.live()
    assert new not in (old, live) and store.complete() == [live, new]
    _assert_sound(store, new)
    summary = _publish(project, model="eval", keep_versions=1)      # the next publish cleans up
    assert deleting[0] in summary["cleaned"] and not list(store.versions.glob(".deleting-*"))


def test_kill_before_live_moves_in_a_rollback_and_a_publish(project: Path) -> None:
    store = BundleStore(project / "artifacts/published")
    first = _publish(project)["version"]
    second = _publish(project, model="eval")["version"]
    _kill_when(_spawn(ROLLBACK, str(project), pause="live"), "paused at live")
    _assert_sound(store, second)
    assert [e["action"] for e in store.history()] == ["publish", "publish"]
    rollback(store, reason="again")                          # the lock died with the killed process
    _assert_sound(store, first)
    ranker = str(_ranker(project, "c"))                      # new content: a ranker neither version has
    _kill_when(_spawn(PUBLISH, str(project), "full", json.dumps(CFG), ranker, pause="live"), "paused at live")
    _assert_sound(store, first)


def test_kill_during_item_additions_keeps_every_acknowledged_item(project: Path) -> None:
    store = BundleStore(project / "artifacts/published")
    live = _publish(project)["version"]
    lines = _kill_when(_spawn(ADD, str(project)), "added 1000030")
    acked = {int(line.split()[1]) for line in lines if line.startswith("added")}
    folder = store.version_dir(live) / ADDED_DIR
    for path in folder.glob("*.parquet"):
        pq.read_table(path)                                  # every listed file is whole
    added = set(read_additions(store.version_dir(live))["item_id"].tolist())
    assert acked <= added and len(added) <= len(acked) + 1
    _assert_sound(store, live)


def test_sidecar_and_live_files_are_fsynced_before_their_rename(project: Path, monkeypatch) -> None:
    """The order that makes a rename durable: data flushed, then the name, then the folder."""
    import flows.durable as durable
    from flows.serving.store import write_additions

    store = BundleStore(project / "artifacts/published")
    live = _publish(project)["version"]
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd))[1])
    monkeypatch.setattr(durable.os, "replace", lambda a, b: (calls.append(("replace", str(a))), real_replace(a, b))[1])
    import pyarrow as pa
    table = pa.table({"item_id": [123456]})
    path = write_additions(store.version_dir(live), "x", table)
    tmp = next(c[1] for c in calls if c[0] == "replace")
    assert calls.index(("fsync", tmp)) < calls.index(("replace", tmp)), calls
    assert calls[-1] == ("fsync", str(path.parent)), calls   # the new name itself
    shutil.rmtree(path.parent)


def test_index_prune_keeps_the_live_version_and_removes_what_killed_writers_left(project: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    store = BundleStore(project / "artifacts/published")
    _publish(project)
    _publish(project, model="eval")
    live = _publish(project, ranker=_ranker(project, "a"))["version"]
    dead = 2**22 + 12345                                       # above the default pid_max: no such process
    (store.root / f".LIVE.{dead}.tmp").write_text("half")
    (store.versions / f".partial-x-{dead}").mkdir()
    result = CliRunner().invoke(app, ["index", "prune", "--keep", "1", "--params", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "removed 2 version(s)" in result.output and "2 leftover(s)" in result.output
    assert store.complete() == [live] and not list(store.root.glob(".*.tmp"))
    assert [p.name for p in store.versions.iterdir()] == [live]
    _assert_sound(store, live)
