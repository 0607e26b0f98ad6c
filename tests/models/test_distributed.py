"""Data-parallel training (models/distributed.py): 2 gloo processes on the synthetic contract data."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from models.distributed import shard, spawn_fit
from models.errors import ModelError
from models.params import TrainParams
from models.training import fit
from training_data import run_sample, stream_and_config, synthetic_training_dir

pytestmark = pytest.mark.long_running     # tests/conftest.py: runs first

DDP_TRAIN = TrainParams(epochs=4, batch_size=128, lr=0.005, threads=2, negatives=8, ssl_weight=0.1,
                        early_stopping=False)


class RecordEpoch:
    """on_epoch callback that appends 'rank epoch' to a file (picklable, so spawned ranks can run it)."""

    def __init__(self, path: Path, kill_at: int | None = None):
        self.path, self.kill_at = path, kill_at

    def __call__(self, epoch: int) -> None:
        with self.path.open("a") as f:
            f.write(f"{os.environ.get('RANK', 'none')} {epoch}\n")
        if epoch == self.kill_at:
            raise RuntimeError(f"killed after epoch {epoch}")


class Diverge:
    """on_epoch callback that raises the library's own error, as a non-finite loss does in a rank."""

    def __call__(self, epoch: int) -> None:
        raise ModelError(f"training loss became nan at epoch {epoch}")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    training, schema = synthetic_training_dir(root)
    run_sample(training, root / "samples")
    return root, training, schema


def test_shard_gives_each_rank_a_disjoint_equal_part_of_the_epoch():
    perm = torch.randperm(1001, generator=torch.Generator().manual_seed(0))
    parts = [shard(perm, r, 3) for r in range(3)]
    assert {len(p) for p in parts} == {334}                       # equal steps on every rank
    seen = torch.cat(parts)
    assert set(seen.tolist()) == set(range(1001))                 # the whole epoch
    assert len(seen) - len(set(seen.tolist())) == 1               # only the padding repeats
    assert torch.equal(shard(perm, 0, 1), perm)


def test_two_workers_learn_like_one_resume_and_write_checkpoints_from_rank_0(synthetic, tmp_path):
    torch.set_num_threads(1)
    root, training, schema = synthetic
    _, stream, tower_cfg, _ = stream_and_config(training, schema, root / "samples")
    one = fit(stream, tower_cfg, DDP_TRAIN, seed=0)
    two_cfg = DDP_TRAIN.model_copy(update={"workers": 2})
    whole = spawn_fit(stream, tower_cfg, two_cfg, seed=0)

    # same shape as one worker: it learns every epoch, and ends near where one worker ends (each
    # rank's batch is batch_size, so two workers take half the optimizer steps per epoch: their loss
    # trails one worker's a little)
    assert len(whole.losses) == 4 and all(np.isfinite(whole.losses))
    assert all(b < a for a, b in zip(whole.losses, whole.losses[1:]))
    assert whole.losses[-1] < whole.losses[0] - 0.2 and one.losses[-1] < one.losses[0] - 0.2
    assert abs(whole.losses[-1] - one.losses[-1]) < 0.12 * one.losses[-1]
    assert not whole.model.training

    # killed after epoch 2, resumed: the same run as the uninterrupted one; rank 0 alone checkpoints
    ckpt, record = tmp_path / "ckpt" / "eval.pt", tmp_path / "epochs.txt"
    with pytest.raises(ProcessRaisedException, match="killed after epoch 2"):
        spawn_fit(stream, tower_cfg, two_cfg, seed=0, checkpoint=ckpt, on_epoch=RecordEpoch(record, kill_at=2))
    assert torch.load(ckpt, weights_only=True)["losses"] == pytest.approx(whole.losses[:2], rel=1e-5)
    resumed = spawn_fit(stream, tower_cfg, two_cfg, seed=0, checkpoint=ckpt, on_epoch=RecordEpoch(record))
    assert record.read_text().split("\n")[:-1] == ["0 1", "0 2", "0 3", "0 4"]
    assert resumed.resumed_from == 2
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-5)
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)



def test_a_ranks_model_error_reaches_the_parent_as_itself(synthetic, tmp_path, monkeypatch):
    root, training, schema = synthetic
    _, stream, tower_cfg, _ = stream_and_config(training, schema, root / "samples")
    cfg = DDP_TRAIN.model_copy(update={"workers": 2, "epochs": 1})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))     # where torch puts its ranks' error files
    with pytest.raises(ModelError, match="^training loss became nan at epoch 1$"):
        spawn_fit(stream, tower_cfg, cfg, seed=0, on_epoch=Diverge())
    # and leaves none behind (torch's own spawn keeps the failed rank's traceback file)
    assert list(tmp_path.iterdir()) == []


def test_two_workers_train_with_sparse_embedding_gradients(synthetic):
    # the large tables' sparse gradients go through gloo's all-reduce one bucket at a time
    # (models.distributed.one_at_a_time) and average like the dense ones: the same run as dense tables
    torch.set_num_threads(1)
    root, training, schema = synthetic
    _, stream, tower_cfg, _ = stream_and_config(training, schema, root / "samples")
    cfg = DDP_TRAIN.model_copy(update={"workers": 2, "epochs": 2, "sparse_min_rows": 1})
    result = spawn_fit(stream, tower_cfg, cfg, seed=0)
    assert any("sparse gradients" in n for n in result.notes)
    assert len(result.losses) == 2 and result.losses[1] < result.losses[0]
    dense = spawn_fit(stream, tower_cfg, cfg.model_copy(update={"sparse_min_rows": "off"}), seed=0)
    assert not any("sparse gradients" in n for n in dense.notes)
    np.testing.assert_allclose(result.losses, dense.losses, rtol=2e-4)   # SparseAdam and Adam: close, not equal


# Trains for a long time in two ranks; after the first epoch rank 0 writes `started`.
_CALLER = """
import sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}, {tests!r} + '/models']
from models.distributed import spawn_fit
from models.params import TrainParams
from training_data import stream_and_config
from test_distributed import RecordEpoch
_, stream, tower_cfg, _ = stream_and_config(Path({training!r}), Path({schema!r}), Path({samples!r}))
cfg = TrainParams(epochs=10_000, batch_size=128, threads=2, workers=2, early_stopping=False)
spawn_fit(stream, tower_cfg, cfg, seed=0, on_epoch=RecordEpoch(Path({started!r})))
"""


def test_the_ranks_end_when_the_process_that_started_them_is_killed(synthetic, tmp_path):
    """A train stage killed with -9 (or by the OOM killer) leaves no rank training on: the ranks are
    the fork server's children, so each watches the caller itself (torch's spawn had its ranks
    signalled when their parent died)."""
    root, training, schema = synthetic
    started = tmp_path / "started"
    tests = Path(__file__).resolve().parents[1]
    script = _CALLER.format(root=str(tests.parent), tests=str(tests), training=str(training),
                            schema=str(schema), samples=str(root / "samples"), started=str(started))
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    below: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline and caller.poll() is None:
            time.sleep(0.2)
        assert started.exists(), f"no epoch finished (exit {caller.poll()})"
        below = psutil.Process(caller.pid).children(recursive=True)
        ranks = [p for p in below if "forkserver" in " ".join(p.cmdline()) and p.ppid() != caller.pid]
        assert len(ranks) == 2, [p.cmdline() for p in below]
        caller.kill()
        caller.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive, f"ranks still running 15 s after their caller was killed: {[p.pid for p in alive]}"
    finally:     # whatever the outcome, nothing of it trains on after the test
        caller.kill()
        for p in below:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
