"""Files of a training run: the per-epoch checkpoint a killed run resumes from, and the trained model.

A checkpoint holds everything that decides the rest of the run (weights, optimizer, LR schedule, the
torch.Generator behind every random draw) plus the epochs' progress, so a resumed run ends with the
model an uninterrupted one would. A trained model is model.pt (config + weights), encoder.json
(vocabularies) and model.json (the readable config and whatever the caller adds).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from models.encoding import FeatureEncoder
from models.errors import ModelNotFound
from models.optim import TowerOptimizer, TowerSchedule, make_optimizer, set_sparse
from models.params import TrainParams
from models.towers import TwoTower, TwoTowerConfig

MODEL_FILES = ("model.pt", "encoder.json")


def save_checkpoint(path: Path, model: TwoTower, opt: TowerOptimizer | torch.optim.Optimizer,
                    sched: TowerSchedule | torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                    progress: dict[str, Any]) -> None:
    """Write, fsync, then rename, so a kill (or a power cut) during the write leaves the previous
    checkpoint intact. Only tensors, numbers, strings and containers: restore loads it weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                    "generator": gen.get_state(), **progress}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def restore_checkpoint(path: Path, model: TwoTower, opt: TowerOptimizer | torch.optim.Optimizer,
                       sched: TowerSchedule | torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator,
                       progress_keys: tuple[str, ...]) -> dict[str, Any]:
    """Load the saved states into model, opt, sched and gen; return the saved progress fields.
    weights_only: unpickling a checkpoint never runs code (a planted file cannot either)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["schedule"])
    gen.set_state(state["generator"])
    return {name: state[name] for name in progress_keys}


def save_model(out_dir: Path, model: TwoTower, encoder: FeatureEncoder, extra: dict | None = None) -> None:
    """out_dir/model.pt (config + weights), encoder.json (vocabularies), model.json (readable config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, out_dir / "model.pt")
    encoder.save(out_dir / "encoder.json")
    meta = {"config": model.cfg.to_dict(), **(extra or {})}
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_model(model_dir: Path) -> tuple[TwoTower, FeatureEncoder]:
    """The model and encoder that save_model wrote to model_dir."""
    for name in MODEL_FILES:
        if not (model_dir / name).exists():
            raise ModelNotFound(f"{model_dir / name}: not found")
    saved = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    model = TwoTower(TwoTowerConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model, FeatureEncoder.load(model_dir / "encoder.json")


def save_warm_start(path: Path, model: TwoTower, train_cfg: TrainParams, seed: int,
                    progress_keys: tuple[str, ...]) -> None:
    """A checkpoint at epoch 0 holding `model`'s weights, a fresh optimizer (the run's: models/optim.py)
    and LR schedule, and the seed's generator: the training loop "resumes" from it, so a fine-tune
    starts from trained weights through the same code path (and the same kill-and-resume guarantees)
    as any run."""
    # the factor itself is not saved (LambdaLR keeps callables out of its state), only the step count
    opt, sched = make_optimizer(model, train_cfg, lambda t: 1.0)
    set_sparse(model, None)
    gen = torch.Generator().manual_seed(seed)
    empty: dict[str, Any] = {"losses": [], "seconds": [], "val_ndcg": [], "best_epoch": None,
                             "stopped_early": False}
    save_checkpoint(path, model, opt, sched, gen, {k: empty.get(k) for k in progress_keys})
