"""The training benchmark's yardstick (flows/experiments/minimal_two_tower.py) and the comparison
`towerflow bench` reports (flows/experiments/train_bench.py compare)."""
from __future__ import annotations

import torch

from flows.experiments.minimal_two_tower import MinimalTwoTower, minimal_fit
from flows.experiments.train_bench import catalog_sweep, compare, main
from models.params import TrainParams
from training_data import run_sample, stream_and_config, synthetic_training_dir


def test_minimal_two_tower_learns_and_ours_is_timed_beside_it(tmp_path):
    torch.set_num_threads(1)
    training, schema = synthetic_training_dir(tmp_path)
    run_sample(training, tmp_path / "samples")
    _, stream, tower_cfg, _ = stream_and_config(training, schema, tmp_path / "samples")
    model = MinimalTwoTower(tower_cfg)
    # the same sizes as ours: embedding table, hidden layers and output
    assert model.item_emb.weight.shape == (tower_cfg.n_items, tower_cfg.embedding_dim)
    assert model.user_tower.mlp[-1].out_features == tower_cfg.dim
    seconds, losses = minimal_fit(stream, tower_cfg, batch_size=128, lr=0.01, seed=0, epochs=3)
    assert len(seconds) == 3 and losses[-1] < losses[0]

    figures = compare(stream, tower_cfg, TrainParams(batch_size=128, threads=1, ssl_weight=0.1), seed=0, rounds=2)
    assert figures["examples"] == len(stream) and figures["threads"] == 1
    assert len(figures["ours_examples_per_s"]) == len(figures["minimal_examples_per_s"]) == 2
    assert all(x > 0 for x in figures["ours_examples_per_s"] + figures["minimal_examples_per_s"])
    assert figures["ratio_ours_to_minimal"] > 0 and len(figures["load_average_1min"]) == 3


def test_catalog_sweep_times_dense_and_sparse_steps(capsys):
    torch.set_num_threads(1)
    rows = catalog_sweep([300, 3000], steps=2, warmup=1, batch=64, history=5)
    assert [r["item_rows"] for r in rows] == [300, 3000]
    assert all(r["dense_adam_ms"] > 0 and r["sparse_ms"] > 0 for r in rows)
    main(["--catalog-sweep", "300"])                    # no --data needed
    assert '"item_rows": 300' in capsys.readouterr().out
