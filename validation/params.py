"""The `validate:` section of params.yaml: thresholds and severities of the data checks.

Kept free of great_expectations imports so that loading params.yaml stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from models.params import Section

Severity = Literal["error", "warn"]


class SeverityParams(Section):
    """What a failed check does: 'error' stops the pipeline, 'warn' is reported and the run goes on.

    Every expectation belongs to one check: columns (required columns and their types), keys (ids
    not null, keys unique), values (ranges, sets, timestamps, positions, clicks), references (ids
    known to users/items), volume (row counts against the previous validated run) and distribution
    (null shares, rating mean, categorical cardinality).
    """

    columns: Severity = "error"
    keys: Severity = "error"
    values: Severity = "error"
    references: Severity = "error"
    volume: Severity = "warn"
    distribution: Severity = "warn"


def _pair(value: tuple[float, float] | None, name: str) -> None:
    if value is not None and value[0] > value[1]:
        raise ValueError(f"{name}: lower bound {value[0]} is above upper bound {value[1]}")


class ValidateParams(Section):
    # Events before this are taken as broken clocks or unit mix-ups (milliseconds read as seconds
    # land in 1970); naive values are UTC, like every timestamp of the contract.
    timestamp_floor: datetime = datetime(1990, 1, 1, tzinfo=timezone.utc)
    volume_factor: float = Field(3.0, gt=1)          # rows within [previous / f, previous * f]
    rating_range: tuple[float, float] | None = None  # every rating in [lo, hi] (null: any)
    rating_mean: tuple[float, float] | None = None   # mean rating in [lo, hi] (null: unchecked)
    max_null_share: float = Field(0.1, ge=0, le=1)   # per feature column (users, items, training set)
    # Rows of interactions that share (user_id, item_id, timestamp) with another row: a few happen
    # (a double click logged in the same second); more is a re-delivered export or a double load.
    max_duplicate_share: float = Field(0.02, ge=0, le=1)
    categorical_cardinality: tuple[PositiveInt, PositiveInt] = (1, 100_000)
    chunk_rows: PositiveInt = 1_000_000               # larger tables are validated in batches
    sample_rows: PositiveInt = 1_000_000              # distribution checks: uniform sample at most this big
    # processes checking a table of several batches at once (auto: the usable cores; 1: here)
    workers: PositiveInt | Literal["auto"] = "auto"
    severity: SeverityParams = SeverityParams()

    @field_validator("timestamp_floor", mode="before")
    @classmethod
    def _utc(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):  # YAML `1990-01-01`
            value = datetime(value.year, value.month, value.day)
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value

    @field_validator("timestamp_floor")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:  # a naive ISO string: same rule as above
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _ordered(self) -> "ValidateParams":
        _pair(self.rating_range, "rating_range")
        _pair(self.rating_mean, "rating_mean")
        _pair(self.categorical_cardinality, "categorical_cardinality")
        return self


@dataclass(frozen=True)
class EventRules:
    """What an event must meet beyond the ids: the validate section in force for this source
    (flows/params.validate_for_source), the rating an event without one gets (None: it must carry
    one, when the source has ratings) and the clock skew tolerated at the door."""

    validate: ValidateParams
    rating_fill: float | None = None
    future_tolerance_s: float = 0.0
