"""kill -9 of a publishing process: during the upsert, and after the bundle is complete but before
LIVE moves. The live version keeps answering, and the next publish cleans up or finishes the job.

The publish runs in a real subprocess, paused at a named step by TOWERFLOW_TEST_PAUSE_AT (see
flows.serving.index.base.pause_point), then SIGKILLed.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.params import PublishParams
from flows.serving.bundles import BundleStore
from flows.stages.publish import publish

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys
from pathlib import Path
from flows.params import PublishParams
from flows.stages.publish import publish
root, model, cfg = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
publish(root / "artifacts/model" / model, root / "data/training", root / "data/ingested/schema.json",
        PublishParams(**cfg), root / "artifacts/published")
"""


def _publish_in_process(root: Path, model: str, cfg: dict) -> dict:
    return publish(root / "artifacts/model" / model, root / "data/training", root / "data/ingested/schema.json",
                   PublishParams(**cfg), root / "artifacts/published")


def _live(root: Path, backend: str) -> tuple[dict, BundleStore, str]:
    """The publish settings of a fault test, the bundle store and the version published with them."""
    cfg = {"backend": backend, "upsert_batch": 10, "verify_users": 20}
    return cfg, BundleStore(root / "artifacts/published"), _publish_in_process(root, "full", cfg)["version"]


def _kill_at(root: Path, step: str, model: str, cfg: dict, timeout: float = 120) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOWERFLOW_TEST_PAUSE_AT=step, TOWERFLOW_TEST_PAUSE_S="300")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), model, json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == f"paused at {step}", f"no pause ({line!r}): {proc.stderr.read() if proc.poll() is not None else ''}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()   # reaped: its pid is no longer alive for the next publish's cleanup


def _answers(root: Path, store: BundleStore) -> None:
    from flows.serving.recommend import Recommender

    users = pd.read_parquet(root / "data/ingested/interactions.parquet")["user_id"].unique()[:3].tolist()
    with Recommender.load_live(root / "artifacts/published", root / "data/feast", root / "data/features") as rec:
        assert rec.version == store.live()
        recs = rec.recommend(users, 5)
        assert recs.groupby("user_id").size().tolist() == [5, 5, 5]
        vectors = pd.read_parquet(store.live_dir() / "item_vectors.parquet")
        (hits,) = rec.index.search(np.stack(vectors["vector"].to_numpy())[[0]], 1)
        assert hits[0][1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("backend", ["qdrant-local", "qdrant-edge"])
def test_kill_during_upsert_leaves_live_and_the_next_publish_cleans_up(project: Path, backend: str) -> None:
    cfg, store, live = _live(project, backend)
    _kill_at(project, "upsert", "eval", cfg)
    partials = [p.name for p in store.versions.glob(".partial-*")]
    assert len(partials) == 1 and store.live() == live and store.complete() == [live]
    _answers(project, store)

    after = _publish_in_process(project, "eval", cfg)
    assert after["cleaned"] == partials and after["action"] == "built" and store.live() == after["version"]
    assert not list(store.versions.glob(".partial-*"))
    _answers(project, store)


@pytest.mark.parametrize("backend", ["qdrant-local", "qdrant-edge"])
def test_kill_between_upsert_and_switch_leaves_live_and_the_next_publish_switches(project: Path, backend: str) -> None:
    cfg, store, live = _live(project, backend)
    _kill_at(project, "switch", "eval", cfg)
    (orphan,) = [v for v in store.complete() if v != live]     # complete and verified, never live
    assert store.live() == live and not list(store.versions.glob(".partial-*"))
    assert [e["to"] for e in store.history()] == [live]
    _answers(project, store)

    after = _publish_in_process(project, "eval", cfg)
    assert after["action"] == "reused" and after["version"] == orphan and store.live() == orphan
    _answers(project, store)
