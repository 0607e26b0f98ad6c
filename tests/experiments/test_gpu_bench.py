"""flows/experiments/gpu_bench.py: the GPU training benchmark stops with a clear message where no GPU is
visible, and, rehearsed with its GPU rows on the CPU, runs the train stage's validation run per seed
and device and the throughput rows, writing every row it measured."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.experiments.gpu_bench import gpu_bench
from flows.params import load_params
from training_data import SMALL_MODEL, run_sample, synthetic_training_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project's data folder: training/, samples/ (train + full), ingested/schema.json."""
    root = tmp_path_factory.mktemp("gpu_bench")
    training, schema = synthetic_training_dir(root)
    run_sample(training, root / "samples")
    (root / "ingested").mkdir()
    shutil.copy(schema, root / "ingested/schema.json")
    return root


def _params(**train):  # noqa: ANN003, ANN202
    params = load_params(ROOT / "params.yaml", [])
    return params.model_copy(update={"model": SMALL_MODEL,
                                     "train": params.train.model_copy(update={"threads": 1, **train})})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU: the no-GPU message cannot show")
def test_without_a_gpu_it_says_so_before_any_work(project_data: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no CUDA GPU visible"):
        gpu_bench(_params(), project_data, project_data, [0], 1, [], tmp_path / "gpu.json")
    assert not (tmp_path / "gpu.json").exists()


def test_rehearsed_on_the_cpu_it_writes_every_row(project_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    doc = gpu_bench(_params(epochs=2, batch_size=256, ssl_batch_size=64), project_data, project_data, [0, 1], 2,
                    [512], out, gpu="cpu", profile_steps=3)
    assert json.loads(out.read_text()) == doc
    # the GPU rows (default, float32, the larger batch), then the CPU row at the default batch
    assert [(r["batch_size"], r["mixed_precision"]) for r in doc["throughput"]] == [(256, False), (256, False), (512, False), (256, False)]
    assert [len(r["examples_per_s_by_epoch"]) for r in doc["throughput"]] == [2, 2, 2, 1]
    assert all(r["examples"] > 0 and r["examples_per_s"] > 0 for r in doc["throughput"])
    # the train stage's validation run, each seed on each device, NDCG@20 after every epoch
    assert [(r["device"], r["seed"]) for r in doc["metrics"]] == [("cpu", 0), ("cpu", 1)] * 2
    assert all(len(r["val_ndcg@20"]) == 2 and 0 < r["best_val_ndcg@20"] <= 1 for r in doc["metrics"])
    # every row trained afresh (none resumed from another's checkpoint); one seed on one device: the
    # same run to the bit
    assert [r["resumed_from_epoch"] for r in doc["metrics"]] == [0] * 4
    assert doc["metrics"][0]["val_ndcg@20"] == doc["metrics"][2]["val_ndcg@20"]
    assert doc["summary"]["cpu"]["sd"] >= 0 and doc["summary"]["gpu_over_cpu_at_default_batch"] > 0
    # where a step's time goes, on the GPU rows' device and on the CPU: the labelled parts and the step
    assert list(doc["profile"]) == ["cpu"]            # rehearsed: the GPU rows' profile is the CPU's too
    parts = {r["part"]: r["ms_per_step"] for r in doc["profile"]["cpu"]}
    assert {"towers", "backward", "optimizer", "step"} <= set(parts) and min(parts.values()) >= 0
    labelled = sum(ms for part, ms in parts.items() if part not in ("step", "other (batch gather, zero_grad)"))
    assert 0 < labelled <= parts["step"]             # the labelled parts do not overlap
