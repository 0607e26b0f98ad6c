"""Typed config sections read by the model stages (sample, train, evaluate).

Kept free of torch imports so that loading params.yaml stays fast.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt


def _yaml_off(value: Any) -> Any:
    """YAML reads a bare `off` as false (and `on` as true): false is the setting `off`; true says nothing."""
    if value is False:
        return "off"
    if value is True:
        raise ValueError("give auto, a row count or off")
    return value


# a table size from which embedding gradients are sparse (models/optim.py): auto, a count, or off
SparseRows = Annotated[PositiveInt | Literal["auto", "off"], BeforeValidator(_yaml_off)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitParams(Section):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    min_user_interactions: PositiveInt = 5


class SampleParams(Section):
    popular_threshold: float = Field(0.01, gt=0)
    hard_negatives: NonNegativeInt = 16            # items per example mined from ranking logs (0: none)
    shown_unclicked_negatives: bool = False        # also mine shown-but-not-clicked items (ablation)


class ModelParams(Section):
    dim: PositiveInt = 64
    hidden: list[PositiveInt] = [128]
    embedding_dim: PositiveInt = 64
    user_id_embedding: bool = False
    temperature: float = Field(0.07, gt=0)
    learn_temperature: bool = False   # true: temperature is a trained parameter starting at `temperature`
    min_count: PositiveInt = 1        # a feature value needs this many distinct users/items, else OOV
    behaviour_counts: bool = True     # user tower reads interactions_total / interactions_<w>d (Feast)


class TrainParams(Section):
    epochs: PositiveInt = 10                       # the most epochs; early stopping may choose fewer
    batch_size: PositiveInt = 1024
    lr: float = Field(0.003, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["listwise", "pairwise", "pointwise"] = "listwise"
    logq: bool = True
    negatives: NonNegativeInt = 0                  # extra negatives per example besides the in-batch ones
    hard_ratio: float = Field(0.5, ge=0, le=1)     # share of the extra negatives mined from ranking logs
    easy_power: float = Field(0.75, ge=0)          # easy negatives ~ (count + 1)^easy_power over the catalog
    ssl_weight: float = Field(0.1, ge=0)           # alpha of the self-supervised item-tower loss (0: off)
    ssl_masking: Literal["random", "correlated"] = "correlated"
    ssl_temperature: float = Field(0.1, gt=0)
    ssl_batch_size: PositiveInt = 512
    ssl_power: float = Field(0.0, ge=0)            # SSL items ~ (count + 1)^ssl_power (0: uniform)
    ssl_dropout: float = Field(0.1, ge=0, lt=1)    # drop rate of multi-valued feature values per view
    # share of the retrieval loss's positives whose item id the item tower does not see (OOV): it learns
    # to score items from their features alone, as it must for items without interactions (models/objective.py)
    item_id_dropout: float = Field(0.1, ge=0, lt=1)
    early_stopping: bool = True
    patience: PositiveInt = 2                      # epochs without a better validation NDCG@20
    val_fraction: float = Field(0.2, gt=0, lt=1)   # each user's last share of training rows
    refit_full: bool = True
    read_batch_rows: PositiveInt = 50_000           # rows per parquet batch when streaming the samples
    threads: PositiveInt | Literal["auto"] = "auto"  # torch threads in all (split between workers); auto: min(2, cores)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: a CUDA GPU when present (models/device.py)
    mixed_precision: bool = True                   # bf16 autocast of the towers, on a GPU only (never on the CPU)
    compile: bool = False                          # torch.compile the towers (needs a C compiler; compile time first)
    workers: PositiveInt = 1                       # data-parallel processes (torch DDP, gloo); 1: in process
    # the eval and refit models at once, each in a forked process (flows/stages/train.py fit_processes)
    fit_processes: PositiveInt | Literal["auto"] = "auto"
    # embedding tables of at least this many rows train on sparse gradients (SparseAdam; models/optim.py)
    sparse_min_rows: SparseRows = "auto"


class EvaluateParams(Section):
    ks: list[PositiveInt] = [20, 100]
    tail_share: float = Field(0.8, gt=0, lt=1)     # tail = the less popular share of the catalog
    ease: bool = True                               # compute the EASE baseline
    ease_lambdas: list[PositiveFloat] = Field([50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0], min_length=1)
    ease_max_items: PositiveInt = 10000             # EASE inverts an items × items matrix: skipped above
    max_users: PositiveInt | None = 20_000          # held-out users scored per model (a fixed sample above; null: all)
    # λ is picked on each user's last share of their training interactions (the test split's rules)
    validation: SplitParams = SplitParams()
