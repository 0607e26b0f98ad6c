"""The `rank` section of params.yaml: which position-bias models to fit and how.

Kept free of torch imports so that loading params.yaml stays fast. The seed is not here: the caller
passes `base.seed` (one shared value, STYLE.md §3).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from models.params import Section, SparseRows


RankModel = Literal["naive", "pal", "additive", "dot", "bilinear", "mixture", "xpa", "dla"]


class RankParams(Section):
    models: list[RankModel] = Field(["naive", "pal", "additive", "dot", "bilinear", "mixture", "xpa", "dla"],
                                    min_length=1)
    # LightGBM lambdarank + position field: a row of the report and a candidate of serve: auto
    lightgbm: bool = True
    # LightGBM lambdarank on the raw clicks (no position correction): a row and a candidate too, the
    # ranker a team replacing LightGBM ran before; served only by validation, and then with a warning
    # when the clicks are position-biased. It won on a confounding logger's clicks (docs/RANKING.md)
    lightgbm_naive: bool = True
    lightgbm_rounds: PositiveInt = 100
    # LightGBM holds its matrix in memory (rows x ~200 float32 features; two fits at once with rank.workers):
    # cap its rows. 2M -> 500k on the issue-23 700k shape: NDCG@10 0.575 -> 0.577 (naive 0.624 -> 0.618),
    # 185 + 144 -> 52 + 45 s
    lightgbm_max_rows: PositiveInt = 500_000
    embedding_dim: PositiveInt = 16                 # id, position and context embeddings
    hidden: list[PositiveInt] = [64]                # relevance tower MLP
    bias_hidden: list[PositiveInt] = [16]           # bias tower MLP (small: its inputs are few)
    vector_dim: PositiveInt = 8                     # tower output size of the dot-product models
    epochs: PositiveInt = 7
    # per fit: a log whose `epochs` passes take more optimizer steps gets fewer whole passes (at least one;
    # the fit's row says so), so the stage's time stops growing with the log. None: always `epochs`. 8,000
    # steps leave the demo and the 10M scale bench their 7 epochs; the issue-23 700k shape (14M log rows,
    # 1,900 steps an epoch) gets 4: pal NDCG@10 vs held-out clicks 0.602 -> 0.593, click log-likelihood
    # -0.422 -> -0.405 (better: the later passes overfit the clicks), fits 3.5 -> 2 min (docs/RANKING.md)
    max_steps: PositiveInt | None = 8000
    lr: PositiveFloat = 0.01
    # share of the training steps, at the end, over which the lr falls linearly to 0 (0: constant). Clicks
    # are noisy labels: at a constant lr the last weights carry the last batches' noise. With 7 epochs the
    # constant part is the 5 epochs of before. LTR bench, PAL NDCG@10, seeds 42 / 43: 100 sessions 0.694 /
    # 0.740 -> 0.779 / 0.756, 10 sessions 0.712 / 0.676 -> 0.706 / 0.693 (docs/RANKING.md)
    lr_decay: float = Field(0.3, ge=0, le=1)
    # the dual learning algorithm's lr: each click's weight is an inverse propensity up to 5x (dla.MAX_WEIGHT),
    # so its gradients are noisier than the pointwise models'. LTR bench, dla NDCG@10 at 0.01 -> 0.003: confounding
    # logger +0.011 on average over 10 seeds (ahead on 9), random logger (seeds 42 / 43) +0.008 / +0.023 at
    # 10 sessions, +0.019 / -0.011 at 30, +0.015 / -0.004 at 100 (docs/RANKING.md)
    dla_lr: PositiveFloat = 0.003
    weight_decay: NonNegativeFloat = 0.0
    # id tables of at least this many rows (users, items) train on sparse gradients with SparseAdam
    # (models/optim.py): dense Adam updates every row at every step, 140 ms a step with 1M users and 200k
    # items against 5 ms sparse; a step reads ~1,400 rows, so sparse pays from ~20k rows. A count or off
    sparse_min_rows: SparseRows = "auto"
    batch_requests: PositiveInt = 128               # requests (lists) per optimizer step
    read_rows: PositiveInt = 100_000                # parquet rows read at once: bounds memory
    shuffle_buffer: PositiveInt = 32                # batches shuffled together when streaming
    test_fraction: float = Field(0.2, ge=0, lt=1)   # held-out requests, picked by a hash of request_id
    max_position: PositiveInt = 50                  # positions beyond share the last embedding
    max_grid: PositiveInt = 16                      # grid rows/columns beyond share the last embedding
    context_columns: list[str] = []                 # per-impression bias-tower inputs (device, page, ...)
    # Zhao et al. 2019: 10% of impressions lose their position (and the other bias inputs), so the
    # tower learns the "unknown position" value that serving uses (additive and dot-product models)
    position_dropout: float = Field(0.1, ge=0, lt=1)
    mixture_k: PositiveInt = 2                      # Yan et al. 2022: components (user types)
    # E-step sharpness, posterior ∝ exp(-α·Δloss): at 1.0 both components stayed alike on a simulated
    # log of two user types (shares 49/51%); at 2.0 each type went mostly to its own component
    mixture_alpha: PositiveFloat = 2.0
    xpa_heads: PositiveInt = 2                      # Zhuang et al. 2021: cross-positional attention
    xpa_dim: PositiveInt = 16                       # attention size (a multiple of xpa_heads)
    # Zhang et al. 2023: keep the bias tower from absorbing relevance when the logger was good
    observation_dropout: float = Field(0.0, ge=0, lt=1)
    grad_reversal: NonNegativeFloat = 0.0           # weight of the reversed adversary gradient (0: off)
    use_logged_score: bool = False                  # the logging ranker's score carries its policy: opt-in
    retrieval_embeddings: bool = True               # the retrieval towers' user/item vectors as features
    # Generalizing to users and items the logs never showed (issue 22): during training this share of
    # user and item ids is replaced by the OOV id, so the tower also learns to score from features alone
    # (what an unseen id gets: ids absent from the training requests are zeroed to OOV before fitting)
    id_dropout: float = Field(0.1, ge=0, lt=1)
    # items scored from their features alone, no item id embeddings (feature-described catalogs: web
    # search documents, query-document pairs); auto: so when items have features and are shown too
    # rarely in training for an id to be learned (median impressions below 30). User ids stay.
    features_only: bool | Literal["auto"] = "auto"
    # numeric item features scaled over the catalog: quantile (rank → standard normal; robust to heavy
    # tails and outliers) or standard (mean / standard deviation)
    numeric_scaling: Literal["quantile", "standard"] = "quantile"
    # auto: the model of `models` (and LightGBM, when `lightgbm`) that validates best by a debiased
    # metric (models/ranking/select.py); lightgbm: LightGBM lambdarank with its position correction
    serve: RankModel | Literal["auto", "lightgbm", "lightgbm_naive"] = "auto"
    validation_fraction: float = Field(0.1, ge=0, lt=0.5)   # share held out to choose the served model
    # the served network is the mean of this many fits of its kind from seeds base.seed, +1, ...
    # (models/ranking/ensemble.py; 1: the one fit that was chosen). Costs serve_ensemble - 1 more fits of
    # one model. LTR bench, 10 sessions, seeds 42-51: PAL one fit 0.692, the mean of 3 0.709 (higher on every
    # seed), of 5 0.712; the served ranker 0.694 -> 0.705 (docs/RANKING.md)
    serve_ensemble: PositiveInt = 3
    # how the validation share is held out: user (that share of the users, all their non-test requests:
    # the choice then measures users, and items of theirs, that training never saw, as serving meets
    # them), request (a hash of request_id: the users and items are the training ones), or auto: user
    # when the log has enough users for a stable figure (models/ranking/select.py: validation_by)
    validation_by: Literal["auto", "user", "request"] = "auto"
    # early stopping (with serve: auto's validation requests): stop after this many epochs without a
    # lower validation click loss and keep the best epoch's weights; 0: off. Off by default: on a small
    # log (1,500 requests) it stopped PAL at an epoch whose click loss was best but ranking was not
    patience: NonNegativeInt = 0
    threads: PositiveInt = 1                        # torch and LightGBM threads (small models: 1 is enough)
    # fits at once, each in its own forked process on `threads` threads (models/fork_pool.py):
    # auto = the usable cores over threads; 1 = one after another here. The results are the same.
    workers: Literal["auto"] | PositiveInt = "auto"
    # where the neural rankers train: auto = a CUDA GPU when torch sees one, else the CPU (models/device.py);
    # they are returned, scored and saved on the CPU
    device: str = "auto"

    def for_model(self, kind: str) -> RankParams:
        """These params as `kind` trains with them: the dual learning algorithm at its own lr."""
        return self.model_copy(update={"lr": self.dla_lr}) if kind == "dla" else self

    @model_validator(mode="after")
    def _serve_is_trained(self) -> RankParams:
        if self.serve == "auto" and self.validation_fraction <= 0:
            raise ValueError("rank.serve: auto chooses on validation requests; set rank.validation_fraction > 0")
        for name in ("lightgbm", "lightgbm_naive"):
            if self.serve == name and not getattr(self, name):
                raise ValueError(f"rank.serve is {name!r} but rank.{name} is false; set rank.{name}: true")
        if self.serve not in ("auto", "lightgbm", "lightgbm_naive") and self.serve not in self.models:
            raise ValueError(f"rank.serve is {self.serve!r} but rank.models trains only {self.models}; "
                             "add it to rank.models or pick one of them")
        return self
