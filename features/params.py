"""Typed config section for the Feast feature repository."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, PositiveInt


class FeaturesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    history_length: PositiveInt = 50
