"""The training loop (models/training.py): resume after a kill, early stopping, a learned temperature."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from models.checkpoint import save_model
from models.early_stopping import ValidationTask, carve, outside
from models.inference import load_bundle
from models.params import TrainParams
from models.stream import TrainingStream
from models.towers import MIN_TAU
from models.training import fit
from training_data import sampled_synthetic, stream_and_config


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[Path, Path, Path]:
    return sampled_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("sparse_min_rows", ["off", 1])     # 1: every embedding table on SparseAdam
def test_resume_after_interruption_ends_like_an_uninterrupted_run(sampled, tmp_path, sparse_min_rows):
    _, stream, tower_cfg, _ = stream_and_config(*sampled)
    train_cfg = TrainParams(epochs=4, batch_size=256, threads=1, negatives=8, ssl_weight=0.1, lr_schedule="cosine",
                            sparse_min_rows=sparse_min_rows)
    whole = fit(stream, tower_cfg, train_cfg, seed=3)
    assert any("sparse gradients" in n for n in whole.notes) == (sparse_min_rows == 1)

    class Killed(Exception):
        pass

    def kill_after_two(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    ckpt = tmp_path / "ckpt" / "eval.pt"
    with pytest.raises(Killed):
        fit(stream, tower_cfg, train_cfg, seed=3, checkpoint=ckpt, on_epoch=kill_after_two)
    assert ckpt.exists()
    resumed = fit(stream, tower_cfg, train_cfg, seed=3, checkpoint=ckpt)
    assert resumed.resumed_from == 2 and len(resumed.losses) == 4
    assert resumed.losses == whole.losses
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_early_stopping_stops_when_validation_stops_improving(sampled):
    training, _, _ = sampled
    encoder, _, tower_cfg, train_part = stream_and_config(*sampled)
    val = train_part[carve(train_part, 0.2).to_numpy()]
    fit_rows = train_part[outside(train_part, val)]
    assert 0 < len(val) < len(train_part) and len(fit_rows) + len(val) == len(train_part)
    task = ValidationTask.build(encoder, fit_rows, val)
    stream = TrainingStream.build(encoder, fit_rows, pd.read_parquet(training / "items.parquet"))
    # a learning rate this high overfits the tiny data within a few epochs
    train_cfg = TrainParams(epochs=40, batch_size=128, lr=0.05, patience=2, threads=1)
    result = fit(stream, tower_cfg, train_cfg, seed=0, validation=task)
    assert result.stopped_early and len(result.losses) < 40
    assert len(result.val_ndcg) == len(result.losses) == result.best_epoch + train_cfg.patience
    assert max(result.val_ndcg[result.best_epoch:]) <= result.val_ndcg[result.best_epoch - 1]


def test_learned_temperature_trains_and_round_trips(sampled, tmp_path):
    encoder, stream, tower_cfg, _ = stream_and_config(*sampled)
    tower_cfg.learn_temperature, tower_cfg.temperature = True, 0.2
    result = fit(stream, tower_cfg, TrainParams(epochs=3, batch_size=256, threads=1, lr=0.01), seed=1)
    tau = result.summary(len(stream))["learned_temperature"]
    assert MIN_TAU <= tau and abs(tau - 0.2) > 1e-3            # it moved from its start
    save_model(tmp_path / "m", result.model, encoder)
    loaded = load_bundle(tmp_path / "m").model
    assert float(loaded.tau().detach()) == pytest.approx(tau, abs=1e-5)


def test_fit_trains_one_process_and_points_to_the_launcher(sampled):
    _, stream, tower_cfg, _ = stream_and_config(*sampled)
    with pytest.raises(ValueError, match="spawn_fit"):
        fit(stream, tower_cfg, TrainParams(epochs=1, workers=2), seed=0)
