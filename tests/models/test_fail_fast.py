"""Fail fast in the model library: training stops at the first non-finite loss (naming the epoch and
step), and evaluation refuses a model whose vectors are not finite."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from flows.stages.evaluate import evaluate
from models.checkpoint import save_model
from models.errors import ModelError
from models.evaluation import holdout_recommendations, two_tower_scorer
from models.holdout import catalog_task
from models.inference import TwoTowerBundle
from models.params import EvaluateParams, TrainParams
from models.training import DistContext, fit
from training_data import run_sample, stream_and_config, synthetic_training_dir

TRAIN = TrainParams(epochs=3, batch_size=256, threads=1, ssl_weight=0.0)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    training, schema = synthetic_training_dir(root, n_users=120)
    run_sample(training, root / "samples")
    return training, schema, root / "samples"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class NanAt(DistContext):
    """One process, whose loss turns NaN at one optimizer step (as a diverging run's would)."""

    def __init__(self, at_call: int) -> None:
        self.at_call, self.calls = at_call, 0

    def step(self, model, batch_loss):  # noqa: ANN001, ANN201
        def run(b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            self.calls += 1
            loss = batch_loss(model, b, gen)
            return loss * float("nan") if self.calls == self.at_call else loss
        return run


def test_training_stops_at_the_first_non_finite_loss(sampled):
    _, stream, tower_cfg, _ = stream_and_config(*sampled)
    per_epoch = math.ceil(len(stream) / TRAIN.batch_size)
    dist = NanAt(at_call=per_epoch + 2)          # epoch 2, its second step
    epochs_done: list[int] = []
    with pytest.raises(ModelError) as err:
        fit(stream, tower_cfg, TRAIN, seed=0, dist=dist, on_epoch=epochs_done.append)
    message = str(err.value)
    assert f"training loss became nan at epoch 2, step 2 of {per_epoch} (optimizer step {per_epoch + 2})" in message
    assert "lower train.lr" in message
    assert dist.calls == per_epoch + 2 and epochs_done == [1]    # nothing ran after the bad step


def _poisoned(sampled) -> tuple[TwoTowerBundle, pd.DataFrame, pd.DataFrame]:
    training, *_ = sampled
    encoder, stream, tower_cfg, _ = stream_and_config(*sampled)
    model = fit(stream, tower_cfg, TrainParams(epochs=1, batch_size=256, threads=1, ssl_weight=0.0), seed=0).model
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "item" in name).fill_(float("inf"))
    return TwoTowerBundle(model, encoder), pd.read_parquet(training / "examples.parquet"), \
        pd.read_parquet(training / "items.parquet")


def test_evaluation_refuses_non_finite_vectors(sampled, tmp_path):
    bundle, examples, items = _poisoned(sampled)
    task = catalog_task(examples, items)
    with pytest.raises(ModelError, match=r"the model is not finite: \d+ of \d+ (user|item) vectors hold NaN or inf"):
        two_tower_scorer(bundle, task)
    with pytest.raises(ModelError, match="not finite"):
        holdout_recommendations(bundle, task, k=10)
    # the evaluate stage: no metrics and no recommendations are written for such a model
    save_model(tmp_path / "model", bundle.model, bundle.encoder)
    out = tmp_path / "reports"
    with pytest.raises(ModelError, match="retrain it with a lower train.lr"):
        evaluate(EvaluateParams(ks=[10], ease=False), sampled[0], tmp_path / "model", out / "metrics.json",
                 recs_path=out / "quality" / "recs.parquet")
    assert not (out / "metrics.json").exists() and not (out / "quality" / "recs.parquet").exists()
