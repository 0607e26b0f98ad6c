"""Typed config section for the Feast feature repository."""
from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt, field_validator

from models.params import Section


class FeaturesParams(Section):
    history_length: PositiveInt = 50
    # Behaviour counts over these windows (days): interactions_<w>d per user (user tower inputs)
    # and item_popularity_<w>d per item, both point-in-time correct Feast features.
    count_windows_days: tuple[PositiveInt, ...] = (1, 7, 30)
    # Where serving reads features: sqlite (<paths.feast>/online.db) or redis ($REDIS_URL,
    # default localhost:6379; the endpoint comes from the environment, never from here).
    online_store: Literal["sqlite", "redis"] = "sqlite"

    @field_validator("count_windows_days")
    @classmethod
    def _distinct(cls, windows: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(windows)) != len(windows):
            raise ValueError(f"windows must be distinct, got {list(windows)}")
        return tuple(sorted(windows))
