"""Typed config section for the Feast feature repository."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, PositiveInt


class FeaturesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    history_length: PositiveInt = 50
    # Where serving reads features: sqlite (<paths.feast>/online.db) or redis ($REDIS_URL,
    # default localhost:6379; the endpoint comes from the environment, never from here).
    online_store: Literal["sqlite", "redis"] = "sqlite"
