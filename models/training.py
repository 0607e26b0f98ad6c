"""Fit a TwoTower on a sampled positive stream, and save it with its encoder.

The whole stream is encoded into tensors once; a batch is a slice of a seeded permutation, and the
item side of a batch is a gather from the pre-encoded catalog, so there is no per-example Python work.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.encoding import FeatureEncoder
from models.losses import in_batch_softmax
from models.params import ModelParams, TrainParams
from models.towers import Batch, TwoTower, TwoTowerConfig


def model_config(encoder: FeatureEncoder, params: ModelParams) -> TwoTowerConfig:
    """The architecture implied by the fitted vocabularies and the model params."""
    return TwoTowerConfig(
        n_items=encoder.item_ids.size,
        n_users=encoder.user_ids.size,
        user_categorical=[v.size for v in encoder.users.categorical.values()],
        user_numeric=len(encoder.users.numeric),
        user_multi={c: v.size for c, v in encoder.users.multi.items()},
        item_categorical=[v.size for v in encoder.items.categorical.values()],
        item_numeric=len(encoder.items.numeric),
        item_multi={c: v.size for c, v in encoder.items.multi.items()},
        embedding_dim=params.embedding_dim,
        hidden=list(params.hidden),
        dim=params.dim,
        user_id_embedding=params.user_id_embedding,
        temperature=params.temperature,
    )


def to_tensors(arrays: dict[str, np.ndarray]) -> Batch:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def catalog_inputs(encoder: FeatureEncoder, items: pd.DataFrame) -> Batch:
    """Item tower inputs for every item-vocabulary index (row i = index i). Items that only occur in
    interactions, and row 0 (OOV), keep default features (OOV categories, mean numerics)."""
    enc = encoder.encode_items(items.drop_duplicates("item_id"))
    n = encoder.item_ids.size
    out = {}
    for key, arr in enc.items():
        full = np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
        full[enc["item"]] = arr
        out[key] = full
    out["item"] = np.arange(n, dtype=np.int64)
    return to_tensors(out)


@dataclass
class TrainingStream:
    """The positive stream, pre-encoded: per-example user inputs, item indices, weights, log Q."""

    users: Batch                      # per example
    items: Batch                      # per item-vocabulary index
    item_idx: torch.Tensor            # (N,)
    weights: torch.Tensor             # (N,)
    log_q: torch.Tensor               # (n_items,) log of each item's share of the stream

    @classmethod
    def build(cls, encoder: FeatureEncoder, examples: pd.DataFrame, items: pd.DataFrame) -> "TrainingStream":
        item_idx = encoder.item_ids.lookup(examples["item_id"])
        weights = examples["weight"].to_numpy(np.float32) if "weight" in examples.columns \
            else np.ones(len(examples), np.float32)
        counts = np.bincount(item_idx, minlength=encoder.item_ids.size).astype(np.float64)
        # items absent from the stream never appear in a batch; their log Q is never read
        log_q = np.log(np.maximum(counts, 1.0) / max(len(examples), 1))
        return cls(users=to_tensors(encoder.encode_users(examples)), items=catalog_inputs(encoder, items),
                   item_idx=torch.from_numpy(item_idx), weights=torch.from_numpy(weights),
                   log_q=torch.from_numpy(log_q.astype(np.float32)))

    def __len__(self) -> int:
        return len(self.item_idx)


@dataclass
class FitResult:
    model: TwoTower
    losses: list[float] = field(default_factory=list)      # mean loss per epoch
    seconds: list[float] = field(default_factory=list)     # wall time per epoch

    def summary(self, n_examples: int) -> dict:
        total = sum(self.seconds)
        return {
            "final_loss": round(self.losses[-1], 6) if self.losses else None,
            "examples": n_examples,
            "epochs": len(self.losses),
            "seconds_per_epoch": round(total / max(len(self.seconds), 1), 3),
            "examples_per_s": round(n_examples * len(self.seconds) / total, 1) if total > 0 else None,
        }


def fit(stream: TrainingStream, config: TwoTowerConfig, cfg: TrainParams, seed: int) -> FitResult:
    """Adam on in-batch softmax (with log Q correction when cfg.logq). Same inputs + seed → same model."""
    if len(stream) == 0:
        raise ValueError("the training stream is empty: nothing to train on")
    torch.manual_seed(seed)
    model = TwoTower(config)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    result = FitResult(model=model)
    n = len(stream)
    for _ in range(cfg.epochs):
        model.train()
        start_time = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            b = perm[start:start + cfg.batch_size]                      # (B,)
            item = stream.item_idx[b]                                   # (B,)
            users = {k: v[b] for k, v in stream.users.items()}
            items = {k: v[item] for k, v in stream.items.items()}
            q, c = model(users, items)                                  # (B, D), (B, D)
            loss = in_batch_softmax(q, c, config.temperature, item_ids=item,
                                    log_q=stream.log_q[item] if cfg.logq else None,
                                    weights=stream.weights[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
            seen += len(b)
        result.losses.append(total / seen)
        result.seconds.append(time.perf_counter() - start_time)
        logging.getLogger(__name__).info("epoch %d/%d loss %.4f (%.1f s)", len(result.losses), cfg.epochs,
                                         result.losses[-1], result.seconds[-1])
    model.eval()
    return result


def save_model(out_dir: Path, model: TwoTower, encoder: FeatureEncoder, extra: dict | None = None) -> None:
    """out_dir/model.pt (config + weights), encoder.json (vocabularies), model.json (readable config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, out_dir / "model.pt")
    encoder.save(out_dir / "encoder.json")
    meta = {"config": model.cfg.to_dict(), **(extra or {})}
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
