"""Typed config sections read by the model stages (sample, train, evaluate).

Kept free of torch imports so that loading params.yaml stays fast.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitParams(_Section):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    min_user_interactions: PositiveInt = 5


class SampleParams(_Section):
    popular_threshold: float = Field(0.001, gt=0)


class ModelParams(_Section):
    dim: PositiveInt = 64
    hidden: list[PositiveInt] = [128]
    embedding_dim: PositiveInt = 64
    user_id_embedding: bool = False
    temperature: float = Field(0.07, gt=0)
    min_count: PositiveInt = 1        # a feature value needs this many distinct users/items, else OOV


class TrainParams(_Section):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 1024
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    logq: bool = True
    refit_full: bool = True
    threads: PositiveInt = 2


class EvaluateParams(_Section):
    ks: list[PositiveInt] = [20, 100]
