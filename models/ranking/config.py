"""The architecture of a ranking model (`RankerConfig`): sizes read from the data and the `rank` params.

Built once per fit from RankParams and the feature tables (`RankerConfig.build`), saved in the served
ranker's ranker.json, and read back to rebuild the model for serving (models/ranking/bundle.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from models.ranking.catalog import RankFeatures
from models.ranking.params import RankParams

TABLES = ("item_numeric", "user_vectors", "item_vectors")


@dataclass
class RankerConfig:
    n_users: int                         # user vocabulary size, index 0 = OOV
    n_items: int
    item_numeric: int                    # standardized numeric item features
    user_vector_dim: int                 # retrieval-tower user embedding size (0: none)
    item_vector_dim: int
    context_sizes: list[int] = field(default_factory=list)   # vocabulary size of each context column
    grid: bool = False                   # the bias tower reads grid row/col
    max_position: int = 50
    max_grid: int = 16
    embedding_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [64])
    bias_hidden: list[int] = field(default_factory=lambda: [16])
    vector_dim: int = 8
    use_logged_score: bool = False
    position_dropout: float = 0.1
    observation_dropout: float = 0.0
    grad_reversal: float = 0.0
    mixture_k: int = 2
    mixture_alpha: float = 1.0
    xpa_heads: int = 2
    xpa_dim: int = 16
    id_dropout: float = 0.0              # share of ids replaced by OOV in training
    ids: bool = True                     # item id embeddings at all (False: rank.features_only)

    @classmethod
    def build(cls, params: RankParams, features: RankFeatures, grid: bool, ids: bool | None = None) -> RankerConfig:
        """ids None: as rank.features_only says (auto, without the data to judge it by: ids on)."""
        # the architecture fields of the rank section; the rest (epochs, lr, ...) are for fit
        shared = {f.name for f in fields(cls)} & set(RankParams.model_fields)
        p = params.model_dump(include=shared)
        return cls(n_users=len(features.users), n_items=len(features.items),
                   ids=params.features_only is not True if ids is None else ids,
                   item_numeric=features.item_numeric.shape[1],
                   user_vector_dim=features.user_vectors.shape[1],
                   item_vector_dim=features.item_vectors.shape[1],
                   context_sizes=[len(features.contexts[c]) for c in params.context_columns],
                   grid=grid, **p)

    def to_dict(self) -> dict:
        return asdict(self)
