"""train stage on synthetic contract data (tests/training_data.py): models, metrics, curves, losses,
hard negatives, early stopping, missing inputs, and two data-parallel workers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.errors import MissingStageInput
from flows.stages.train import train
from models.inference import load_bundle
from models.params import SampleParams, TrainParams
from training_data import (FAST_TRAIN, SMALL_MODEL, retrieved_logs, run_sample, run_sample_train,
                           synthetic_training_dir)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    training, schema = synthetic_training_dir(root)
    return root, training, schema


def test_train_writes_models_metrics_and_loss_curve(synthetic):
    root, training, schema = synthetic
    model_dir = run_sample_train(root, training, schema)
    for name in ("eval", "full"):
        for f in ("model.pt", "encoder.json", "model.json"):
            assert (model_dir / name / f).exists()
    metrics = json.loads((model_dir / "train_metrics.json").read_text())
    assert metrics["eval"]["epochs"] == FAST_TRAIN.epochs and metrics["eval"]["examples_per_s"] > 0
    assert sorted(p.name for p in (model_dir / "curves").iterdir()) == ["eval.csv", "full.csv"]
    for name in ("eval", "full"):
        loss = pd.read_csv(model_dir / "curves" / f"{name}.csv")
        assert list(loss.columns) == ["epoch", "loss"] and loss["epoch"].tolist() == list(range(1, 9))
        assert loss["loss"].iloc[-1] == pytest.approx(metrics[name]["final_loss"], abs=1e-6)
        assert loss["loss"].iloc[-1] < loss["loss"].iloc[0]    # it learns


def test_train_without_refit_copies_eval_model(synthetic, tmp_path):
    _, training, schema = synthetic
    run_sample(training, tmp_path / "samples")
    train_cfg = TrainParams(epochs=1, batch_size=256, refit_full=False, threads=1, early_stopping=False)
    metrics = train(SMALL_MODEL, train_cfg, 0, tmp_path / "samples", training, schema, tmp_path / "model")
    assert metrics["full"] == {"copy_of": "eval"}
    assert (tmp_path / "model/full/model.pt").read_bytes() == (tmp_path / "model/eval/model.pt").read_bytes()


def test_train_reports_missing_samples(synthetic, tmp_path):
    _, training, schema = synthetic
    with pytest.raises(MissingStageInput, match="train.parquet"):
        train(SMALL_MODEL, FAST_TRAIN, 0, tmp_path / "nowhere", training, schema, tmp_path / "model")


@pytest.mark.parametrize("loss", ["listwise", "pairwise", "pointwise"])
def test_train_stage_with_every_loss_hard_negatives_and_ssl(synthetic, tmp_path, loss):
    _, training, schema = synthetic
    logs = retrieved_logs(training, tmp_path / "logs.parquet")
    summary = run_sample(training, tmp_path / "samples", SampleParams(hard_negatives=4), ranking_logs=logs)
    assert summary["train"]["examples_with_hard_negatives"] > 0 and summary["hard_negatives"]["note"] is None
    train_cfg = TrainParams(epochs=3, batch_size=256, threads=1, loss=loss, negatives=8, ssl_weight=0.2, patience=1)
    metrics = train(SMALL_MODEL, train_cfg, 0, tmp_path / "samples", training, schema, tmp_path / "artifacts/model")
    assert metrics["eval"]["hard_negatives_per_example"] > 0
    assert metrics["eval"]["epochs"] == metrics["validation"]["best_epoch"] == metrics["full"]["epochs"]
    curves = tmp_path / "artifacts/model/curves"
    assert sorted(p.stem for p in curves.iterdir()) == ["eval", "full", "validation"]
    validation = pd.read_csv(curves / "validation.csv")
    assert list(validation.columns) == ["epoch", "loss", "val_ndcg@20"]
    assert validation["val_ndcg@20"].tolist() == pytest.approx(metrics["validation"]["val_ndcg@20"], abs=1e-6)
    assert all(np.isfinite(pd.read_csv(p)["loss"]).all() for p in curves.iterdir())
    assert not (tmp_path / "artifacts/model_ckpt").exists() or not any((tmp_path / "artifacts/model_ckpt").iterdir())


def test_train_without_ranking_logs_says_so(synthetic, tmp_path):
    _, training, schema = synthetic
    summary = run_sample(training, tmp_path / "samples", ranking_logs=None)
    assert summary["hard_negatives"]["note"].startswith("no hard negatives")
    train_cfg = TrainParams(epochs=1, batch_size=256, threads=1, negatives=4, early_stopping=False, refit_full=False)
    metrics = train(SMALL_MODEL, train_cfg, 0, tmp_path / "samples", training, schema, tmp_path / "model")
    assert "no hard negatives" in metrics["eval"]["hard_negatives_note"]


def test_train_stage_with_two_workers_and_early_stopping(synthetic, tmp_path):
    _, training, schema = synthetic
    run_sample(training, tmp_path / "samples")
    train_cfg = TrainParams(epochs=2, batch_size=128, threads=2, workers=2, early_stopping=True, patience=1,
                            refit_full=False)
    metrics = train(SMALL_MODEL, train_cfg, 0, tmp_path / "samples", training, schema, tmp_path / "artifacts/model")
    model_dir = tmp_path / "artifacts/model"
    assert metrics["eval"]["epochs"] == metrics["validation"]["best_epoch"] >= 1
    assert len(metrics["validation"]["val_ndcg@20"]) >= 1
    curves = model_dir / "curves"
    assert sorted(p.stem for p in curves.iterdir()) == ["eval", "validation"]
    assert all(np.isfinite(pd.read_csv(p)["loss"]).all() for p in curves.iterdir())
    assert not any((tmp_path / "artifacts/model_ckpt").glob("*/*.pt"))
    items = pd.read_parquet(training / "items.parquet")
    vectors = load_bundle(model_dir / "eval").encode_items(items)
    assert vectors.shape == (len(items), SMALL_MODEL.dim) and np.isfinite(vectors).all()
    assert (model_dir / "full/model.pt").read_bytes() == (model_dir / "eval/model.pt").read_bytes()


def test_eval_and_refit_models_train_side_by_side_as_they_train_one_after_another(synthetic, tmp_path):
    """train.fit_processes: 2 fits the two models in two forked processes; each model, its metrics and
    its curve are those of the fits one after another (one thread each way: the same arithmetic)."""
    import torch

    _, training, schema = synthetic
    run_sample(training, tmp_path / "samples")
    runs = {}
    for processes in (1, 2):
        cfg = FAST_TRAIN.model_copy(update={"epochs": 3, "fit_processes": processes})
        out = tmp_path / f"p{processes}/model"
        runs[processes] = train(SMALL_MODEL, cfg, 0, tmp_path / "samples", training, schema, out), out
    (seq, seq_dir), (side, side_dir) = runs[1], runs[2]
    assert seq["fit_processes"] == 1 and side["fit_processes"] == 2
    for name in ("eval", "full"):
        assert side[name]["final_loss"] == seq[name]["final_loss"] and side[name]["epochs"] == 3
        a, b = (torch.load(d / name / "model.pt", weights_only=True)["state_dict"] for d in (seq_dir, side_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (side_dir / "curves" / f"{name}.csv").read_text() == (seq_dir / "curves" / f"{name}.csv").read_text()
        assert json.loads((side_dir / name / "model.json").read_text())["trained_on"] == f"{'train' if name == 'eval' else 'full'}.parquet"
    assert not any((side_dir.parent / "model_ckpt").glob("*/*.pt"))


def test_fit_processes_auto_splits_threads_on_a_cpu_only(synthetic):
    from flows.stages.train import fit_processes
    from models.training import DistContext

    from flows.stages.train import AUTO_MAX_ROWS

    auto, one = TrainParams(threads=2, device="cpu"), DistContext()
    assert fit_processes(auto, one, finetune=False, models=2, rows=1000) == 2
    assert fit_processes(auto.model_copy(update={"threads": 1}), one, finetune=False, models=2, rows=1000) == 1
    assert fit_processes(auto, one, finetune=True, models=2, rows=1000) == 1           # a fine-tune: in turn
    # after early stopping's run in this process: a fork would hang on two OpenMP threads
    assert fit_processes(auto, one, finetune=False, models=2, rows=1000, trained_here=True) == 1
    assert fit_processes(auto, one, finetune=False, models=1, rows=1000) == 1          # no refit: one model
    assert fit_processes(auto.model_copy(update={"workers": 2}), one, finetune=False, models=2, rows=1000) == 1
    assert fit_processes(auto.model_copy(update={"fit_processes": 1}), one, finetune=False, models=2, rows=1000) == 1
    # memory: each process holds its own stream and optimizer; above the cap auto keeps one, a count wins
    assert fit_processes(auto, one, finetune=False, models=2, rows=AUTO_MAX_ROWS + 1) == 1
    assert fit_processes(auto.model_copy(update={"fit_processes": 2}), one, finetune=False, models=2,
                         rows=AUTO_MAX_ROWS + 1) == 2


def test_the_refit_model_takes_every_thread_on_a_schedule_fixed_by_the_row_counts():
    """Side by side, the longer fit takes both threads from the epoch in which the shorter one is due to
    end (after floor(epochs * other_rows / rows)), whenever the other process really finished: a thread
    count changes the float sums, so a clock-read schedule gave the refit model other last digits."""
    from flows.stages.train import threads_after

    # the 700k shape: eval 568,014 rows a pass, full 700,000, 10 epochs: 8.1 -> the 9th and 10th on both
    assert [threads_after(e, 10, 700_000, 568_014, 2, 2) for e in range(1, 10)] == [1] * 7 + [2, 2]
    assert [threads_after(e, 10, 568_014, 700_000, 2, 2) for e in range(1, 10)] == [1] * 9   # eval: its share
    assert [threads_after(e, 4, 100, 100, 2, 2) for e in range(1, 4)] == [1, 1, 1]     # equal: neither takes
    assert [threads_after(e, 4, 100, 10, 4, 2) for e in range(1, 4)] == [4, 4, 4]      # the other is short
    assert threads_after(1, 4, 100, 60, 3, 2) == 1 and threads_after(2, 4, 100, 60, 3, 2) == 3   # 3 threads: 1 each


def test_the_refit_model_continues_the_eval_model_on_the_rows_it_never_saw(synthetic, tmp_path):
    """train.refit_from: eval: the refit model starts as this run's eval model ended (its weights, its
    vocabularies first) and trains refit_epochs on every row of the full stream; scratch trains it
    from a fresh initialization for `epochs`."""
    import torch

    from flows.params import TrainSection
    from models.checkpoint import load_model

    _, training, schema = synthetic
    run_sample(training, tmp_path / "samples")
    rows = len(pd.read_parquet(tmp_path / "samples/full.parquet", columns=["split"]))
    base = TrainSection(**FAST_TRAIN.model_dump() | {"epochs": 4, "refit_epochs": 1})
    # scratch from another seed: another initialization (the same seed starts both models alike)
    runs = {mode: train(SMALL_MODEL, base.model_copy(update={"refit_from": mode}), seed, tmp_path / "samples",
                        training, schema, tmp_path / mode) for mode, seed in (("eval", 0), ("scratch", 1))}
    update = runs["eval"]["full"]["update"]
    assert update["mode"] == "continue" and update["from_model"] == "eval" and update["rows"] == rows
    assert runs["eval"]["full"]["epochs"] == 1 and runs["eval"]["full"]["examples"] == rows
    assert runs["eval"]["fit_processes"] == 1
    assert "update" not in runs["scratch"]["full"] and runs["scratch"]["full"]["epochs"] == 4
    (ev, ev_enc), (cont, cont_enc), (scratch, _) = (load_model(tmp_path / d / n) for d, n in
                                                    (("eval", "eval"), ("eval", "full"), ("scratch", "full")))
    # the eval model's vocabularies keep their indices; values only the held-out rows bring come after
    for vocab in ("item_ids", "user_ids"):
        known = getattr(ev_enc, vocab).values
        assert getattr(cont_enc, vocab).values[:len(known)] == known
    # it starts trained: its first epoch's loss is about where the eval model ended, far below a fresh
    # start's first epoch (the same rows would be no easier for a model that never trained)
    # every weight without a vocabulary (the towers' layers) stays near the eval model's: two epochs from
    # it, where a fresh start lands as far as two independent trainings are
    a, b, c = ev.state_dict(), cont.state_dict(), scratch.state_dict()
    shared = [k for k in a if a[k].shape == b[k].shape == c[k].shape and a[k].is_floating_point()]
    assert shared
    moved = sum(float((b[k] - a[k]).norm()) for k in shared)
    fresh = sum(float((c[k] - a[k]).norm()) for k in shared)
    assert moved < 0.25 * fresh, (moved, fresh)
    # never more epochs than the eval model had
    short = train(SMALL_MODEL, base.model_copy(update={"refit_from": "eval", "epochs": 1, "refit_epochs": 2}), 0,
                  tmp_path / "samples", training, schema, tmp_path / "short")
    assert short["eval"]["epochs"] == short["full"]["epochs"] == 1


def test_refit_from_auto_continues_the_eval_model_on_large_streams_only():
    from flows.params import TrainSection
    from flows.stages.train import REFIT_FROM_EVAL_ROWS, refit_from

    auto = TrainSection()
    assert auto.refit_from == "auto"
    assert refit_from(auto, REFIT_FROM_EVAL_ROWS - 1) == "scratch" and refit_from(auto, REFIT_FROM_EVAL_ROWS) == "eval"
    assert refit_from(auto.model_copy(update={"refit_from": "scratch"}), 10 ** 9) == "scratch"
    assert refit_from(auto.model_copy(update={"refit_from": "eval"}), 10) == "eval"
    assert refit_from(FAST_TRAIN, 10 ** 9) == "scratch"        # the model library's TrainParams: no such field


def test_early_stopping_then_the_two_models_on_two_threads_ends(synthetic, tmp_path):
    """Early stopping's validation run trains in the stage's process on two threads; the eval and refit
    models then train in this process, not in forked ones: a child forked after torch's OpenMP threads
    ran hung at its first parallel region on two threads (the refit's last epochs), and the stage
    never ended. Run in a subprocess with a time limit, so that a hang fails the test."""
    import os
    import subprocess
    import sys

    _, training, schema = synthetic
    run_sample(training, tmp_path / "samples")
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from flows.stages.train import train\n"
        "from models.params import ModelParams, TrainParams\n"
        "cfg = TrainParams(epochs=3, batch_size=256, threads=2, early_stopping=True, patience=5)\n"
        "model = ModelParams(dim=32, embedding_dim=32, hidden=[64])\n"
        "root = Path(sys.argv[1])\n"
        "m = train(model, cfg, 0, root / 'samples', Path(sys.argv[2]), Path(sys.argv[3]), root / 'model')\n"
        "print(json.dumps({'fit_processes': m['fit_processes'], 'full': m['full']['epochs']}))\n")
    repo = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(training), str(schema)],
                          capture_output=True, text=True, timeout=120, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"fit_processes": 1, "full": 3}
